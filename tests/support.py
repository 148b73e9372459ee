"""Test helpers: waiting on conditions and events with a deadline and a message."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from pymongo.asynchronous.database import AsyncDatabase

from host.events import HostEvent, Subscription
from host.fleet import hosts_collection_name

Doc = dict[str, Any]
"""A MongoDB document as the tests read and write it."""
Db = AsyncDatabase[Doc]
"""An async PyMongo database of such documents."""

PROBE = "_plugin_host_test_probe"
"""Module name of the ``probe`` fixture: plugin code imports it to signal the test."""


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    message: str | Callable[[], str],
    *,
    timeout: float = 10.0,
    interval: float = 0.005,
) -> Any:
    """Poll ``predicate`` until it is truthy; fail with ``message`` at the deadline.

    ``message`` may be a callable, called at the deadline: what it describes (a process's
    output, say) is then the state at the failure, not at the start of the wait.
    """
    with anyio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(interval)
    said = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout} s waiting until {said}")


async def next_event(
    events: Subscription,
    name: str,
    predicate: Callable[[HostEvent], bool] | None = None,
    *,
    timeout: float = 10.0,
) -> HostEvent:
    """The next event called ``name`` (matching ``predicate``), or fail at the deadline."""
    seen: list[str] = []
    with anyio.move_on_after(timeout):
        async for event in events:
            if event.event == name and (predicate is None or predicate(event)):
                return event
            seen.append(event.event)
    raise AssertionError(f"no {name!r} event within {timeout} s; saw {seen}")


async def drain(events: Subscription, *, quiet: float = 0.05) -> list[HostEvent]:
    """The events that arrive until none has for ``quiet`` seconds."""
    out: list[HostEvent] = []
    while True:
        with anyio.move_on_after(quiet) as scope:
            out.append(await events.__anext__())
        if scope.cancelled_caught:
            return out


async def events_for(
    events: Subscription,
    name: str,
    plugins: set[str],
    *,
    timeout: float = 10.0,
) -> dict[str, HostEvent]:
    """The next ``name`` event of each of ``plugins``, in whatever order they come.

    Different names load concurrently, so waiting for them one after another could skip
    (and lose) an event that arrived first.
    """
    found: dict[str, HostEvent] = {}
    seen: list[str] = []
    with anyio.move_on_after(timeout):
        async for event in events:
            plugin = event.get("plugin")
            if event.event == name and plugin in plugins and plugin not in found:
                found[plugin] = event
                if len(found) == len(plugins):
                    return found
            seen.append(event.event)
    missing = sorted(plugins - set(found))
    raise AssertionError(f"no {name!r} event for {missing} within {timeout} s; saw {seen}")


class Ticks:
    """How often a ticker task woke up: proof that the event loop kept running."""

    count = 0


@contextlib.asynccontextmanager
async def loop_ticks(interval: float = 0.001) -> AsyncIterator[Ticks]:
    """Run a task that counts its wake-ups every ``interval`` s while the block runs."""
    ticks = Ticks()

    async def ticker() -> None:
        while True:
            ticks.count += 1
            await anyio.sleep(interval)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        yield ticks
        tg.cancel_scope.cancel()


def returning(n: int) -> str:
    """Plugin source whose async ``main`` returns ``n``."""
    return f"async def main(ctx, args):\n    return {n}\n"


def torn_pair(n: int, *, sync: bool = False) -> str:
    """Plugin source whose top level sets ``A`` and ``B`` to ``n``; ``main`` returns ``(A, B)``.

    A call that ever sees ``A != B`` saw a half-built version.
    """
    head = "def" if sync else "async def"
    return f"A = {n}\nB = {n}\n{head} main(ctx, args):\n    return (A, B)\n"


@contextlib.asynccontextmanager
async def commands_fail(
    db: Any, data: Mapping[str, Any], mode: str | Mapping[str, Any] = "alwaysOn"
) -> AsyncIterator[None]:
    """While the block runs, the server's ``failCommand`` failpoint is set to ``data`` (in
    ``mode``); it is turned off when the block ends, however it ends."""
    admin = db.client.admin
    await admin.command("configureFailPoint", "failCommand", mode=mode, data=dict(data))
    try:
        yield
    finally:
        await admin.command("configureFailPoint", "failCommand", mode="off")


def status_writes_fail(db: Any, collection: str = "functions") -> AbstractAsyncContextManager[None]:
    """While the block runs, every update and createIndexes on the hosts collection beside
    ``db[collection]`` fails with 13 Unauthorized (a ``failCommand`` failpoint)."""
    return commands_fail(
        db,
        {
            "failCommands": ["update", "createIndexes"],
            "errorCode": 13,
            "namespace": f"{db.name}.{hosts_collection_name(collection)}",
        },
    )
