"""PyMongo's own change-stream resume logic against injected faults.

Failpoints are server-global, so this module runs its own server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from host.embedded import EmbeddedMongoThread

Doc = dict[str, Any]
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def fault_uri() -> Iterator[str]:
    """A server of this module's own, so its failpoints disturb no other test."""
    with EmbeddedMongoThread(port=0) as server:
        yield server.uri


@pytest.fixture
async def fclient(fault_uri: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    """An async client of the fault server; every failpoint is off again afterwards."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(fault_uri, serverSelectionTimeoutMS=5000)
    yield client
    for name in ("failCommand", "failGetMoreAfterCursorCheckout"):
        await client.admin.command("configureFailPoint", name, mode="off")
    await client.close()


@pytest.fixture
async def coll(fclient: AsyncMongoClient[Doc], db_name: str) -> AsyncIterator[AsyncCollection[Doc]]:
    """A fresh collection on the fault server."""
    yield fclient[db_name].c
    await fclient.drop_database(db_name)


async def fail(client: AsyncMongoClient[Doc], name: str, mode: Any, **data: Any) -> None:
    """Configure failpoint ``name``."""
    await client.admin.command("configureFailPoint", name, mode=mode, data=data)


async def ids(stream: AsyncChangeStream[Doc], n: int) -> list[Any]:
    """The documentKey _ids of the next ``n`` events."""
    out = []
    with anyio.fail_after(15):
        for _ in range(n):
            out.append((await stream.next())["documentKey"]["_id"])
    return out


async def drained(stream: AsyncChangeStream[Doc]) -> bool:
    """Nothing further is waiting on the stream (no duplicates after a resume)."""
    return await stream.try_next() is None


async def entered(client: AsyncMongoClient[Doc], name: str = "failCommand") -> int:
    """Turn failpoint ``name`` off; return how many times it fired."""
    reply = await client.admin.command("configureFailPoint", name, mode="off")
    return int(reply["count"])


async def run_around_fault(coll: AsyncCollection[Doc], inject: Any) -> list[Any]:
    """Insert 0-2, read them; inject a fault; insert 3-5 and read; insert 6-7 and read."""
    seen: list[Any] = []
    async with await coll.watch(max_await_time_ms=200) as stream:
        await coll.insert_many([{"_id": i} for i in range(3)])
        seen += await ids(stream, 3)
        await inject()
        await coll.insert_many([{"_id": i} for i in range(3, 6)])
        seen += await ids(stream, 3)
        await coll.insert_many([{"_id": i} for i in range(6, 8)])
        seen += await ids(stream, 2)
        assert await drained(stream)
    return seen


async def test_resume_after_connection_closed_on_get_more(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """A getMore whose connection is closed resumes transparently, nothing lost or repeated."""

    async def inject() -> None:
        await fail(
            fclient, "failCommand", {"times": 1}, failCommands=["getMore"], closeConnection=True
        )

    assert await run_around_fault(coll, inject) == list(range(8))
    assert await entered(fclient) == 1


async def test_resume_when_the_resume_aggregate_fails_too(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """getMore and the resuming aggregate both lose their connection; the stream still resumes."""

    async def inject() -> None:
        await fail(
            fclient,
            "failCommand",
            {"times": 2},
            failCommands=["getMore", "aggregate"],
            closeConnection=True,
        )

    assert await run_around_fault(coll, inject) == list(range(8))
    assert await entered(fclient) == 2


async def test_initial_aggregate_retried_after_connection_closed(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """The opening aggregate is a retryable read: a closed connection is retried once."""
    await fail(
        fclient, "failCommand", {"times": 1}, failCommands=["aggregate"], closeConnection=True
    )
    async with await coll.watch() as stream:
        await coll.insert_one({"_id": "x"})
        assert await ids(stream, 1) == ["x"]
    assert await entered(fclient) == 1


async def test_resume_after_cursor_not_found(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """Error 43 CursorNotFound on getMore is resumable."""

    async def inject() -> None:
        await fail(fclient, "failCommand", {"times": 1}, failCommands=["getMore"], errorCode=43)

    assert await run_around_fault(coll, inject) == list(range(8))
    assert await entered(fclient) == 1


async def test_resume_after_labelled_error_after_checkout(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """failGetMoreAfterCursorCheckout with code 6 carries ResumableChangeStreamError; resumes."""

    async def inject() -> None:
        await fail(fclient, "failGetMoreAfterCursorCheckout", {"times": 1}, errorCode=6)

    assert await run_around_fault(coll, inject) == list(range(8))
    assert await entered(fclient, "failGetMoreAfterCursorCheckout") == 1


async def test_failcommand_error_on_get_more_is_not_labelled(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """failCommand code 6 on getMore fires before checkout: no label, so it is not resumed."""
    async with await coll.watch(max_await_time_ms=200) as stream:
        await fail(fclient, "failCommand", {"times": 1}, failCommands=["getMore"], errorCode=6)
        with pytest.raises(OperationFailure) as info, anyio.fail_after(15):
            await stream.next()
    assert info.value.code == 6
    assert not info.value.has_error_label("ResumableChangeStreamError")


async def test_explicit_error_labels_replace_the_server_labels(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc]
) -> None:
    """errorLabels from a failpoint replace the labels: [] stops a resume, a label forces one."""
    async with await coll.watch(max_await_time_ms=200) as stream:
        await fail(
            fclient, "failGetMoreAfterCursorCheckout", {"times": 1}, errorCode=6, errorLabels=[]
        )
        with pytest.raises(OperationFailure) as info, anyio.fail_after(15):
            await stream.next()
    assert info.value.code == 6
    assert not info.value.has_error_label("ResumableChangeStreamError")

    async def inject() -> None:
        await fail(
            fclient,
            "failCommand",
            {"times": 1},
            failCommands=["getMore"],
            errorCode=280,
            errorLabels=["ResumableChangeStreamError"],
        )

    await coll.drop()
    assert await run_around_fault(coll, inject) == list(range(8))


@pytest.mark.parametrize("code", [280, 216])
async def test_non_resumable_error_surfaces(
    fclient: AsyncMongoClient[Doc], coll: AsyncCollection[Doc], code: int
) -> None:
    """An unlabelled error on getMore (280, 216 ElectionInProgress) reaches the application."""
    async with await coll.watch(max_await_time_ms=200) as stream:
        await fail(fclient, "failCommand", {"times": 1}, failCommands=["getMore"], errorCode=code)
        with pytest.raises(OperationFailure) as info, anyio.fail_after(15):
            await stream.next()
    assert info.value.code == code


def test_sync_resume_after_connection_closed(fault_uri: str, db_name: str) -> None:
    """The synchronous MongoClient's change stream resumes across a closed connection too."""
    client: MongoClient[Doc] = MongoClient(fault_uri, serverSelectionTimeoutMS=5000)
    try:
        coll = client[db_name].c
        with coll.watch(max_await_time_ms=200) as stream:
            coll.insert_one({"_id": 0})
            assert stream.next()["documentKey"] == {"_id": 0}
            client.admin.command(
                "configureFailPoint",
                "failCommand",
                mode={"times": 1},
                data={"failCommands": ["getMore"], "closeConnection": True},
            )
            coll.insert_many([{"_id": 1}, {"_id": 2}])
            assert [stream.next()["documentKey"]["_id"] for _ in range(2)] == [1, 2]
            assert stream.try_next() is None
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
        client.drop_database(db_name)
        client.close()
