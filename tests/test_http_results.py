"""Tests for bounded result encoding (issue 13, item 11): size and time limits, loop turns."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.config import DEFAULT_LIMITS
from host.http import create_app
from host.publish import publish
from host.wire_json import SMALL_RESULT_NODES, ResultTooLarge, encode_result, to_json

from .support import Doc, loop_ticks

pytestmark = pytest.mark.anyio

# Built once at the top level, so a call returns it at once and only the encoding is slow.
RETURN_VALUES = "\n\nasync def main(ctx, args):\n    return VALUES\n"
MANY = "VALUES = list(range(5_000_000))" + RETURN_VALUES
BIG_UNDER_LIMIT = "VALUES = list(range(3_000_000))" + RETURN_VALUES
SLOW_REPR = """
class Slow:
    calls = 0

    def __repr__(self):
        Slow.calls += 1
        raise AssertionError("repr() must not be called to encode a result")

VALUES = {Slow() for _ in range(100)}

async def main(ctx, args):
    return VALUES
"""
SET_OF_STRINGS = "async def main(ctx, args):\n    return {'b', 'c', 'a'}\n"


@contextlib.asynccontextmanager
async def client_for(
    db: AsyncDatabase[Doc], max_result_bytes: int = DEFAULT_LIMITS.max_result_bytes
) -> AsyncIterator[httpx.AsyncClient]:
    """A host serving the test plugins, and an HTTP client on ``create_app(host)``."""
    for name, source in {
        "many": MANY,
        "big": BIG_UNDER_LIMIT,
        "slow_repr": SLOW_REPR,
        "letters": SET_OF_STRINGS,
    }.items():
        await publish(db, name, source)
    async with PluginHost(db, exec_timeout=30.0) as host:
        app = create_app(host, max_result_bytes=max_result_bytes)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://plugin-host") as client,
        ):
            yield client


async def test_a_huge_result_stops_at_the_limit_and_the_loop_keeps_turning(
    db: AsyncDatabase[Doc],
) -> None:
    """5M integers: 500 ResultTooLarge once the JSON passes the limit, the loop ticking."""
    async with client_for(db) as client, loop_ticks() as ticks:
        reply = await client.post("/functions/many/call")
        during = ticks.count
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["type"] == "ResultTooLarge"
    assert error["limit"] == 4_194_304
    assert 4_194_304 < error["size"] < 2 * 4_194_304  # stopped soon after the limit
    assert during > 3, "the event loop did not turn while the result was encoded"


async def test_encoding_past_the_calls_timeout_is_a_timeout(db: AsyncDatabase[Doc]) -> None:
    """A result under the limit that cannot be encoded within the call's timeout: 504."""
    async with client_for(db, max_result_bytes=64 * 1_048_576) as client:
        reply = await client.post("/functions/big/call?timeout=0.2")
    assert reply.status_code == 504
    error = reply.json()["error"]
    assert error["type"] == "PluginTimeout"
    assert "encoding the result" in error["message"]


async def test_sets_are_never_sorted_by_repr(db: AsyncDatabase[Doc]) -> None:
    """A set of unorderable objects is not passed through repr(); strings sort naturally."""
    async with client_for(db) as client:
        objects = await client.post("/functions/slow_repr/call")
        letters = await client.post("/functions/letters/call")
    assert objects.status_code == 500
    assert objects.json()["error"]["type"] == "ResultNotSerializable"
    assert letters.json()["result"] == ["a", "b", "c"]


async def test_encode_result_matches_to_json_on_both_paths() -> None:
    """The one-shot path (small) and the chunked path (large) give the same bytes."""
    small = {"a": [1, 2.5, "é", None, True], "b": {"c": "d"}}
    large = [{"i": i, "s": "x" * (i % 7)} for i in range(SMALL_RESULT_NODES * 2)]
    assert await encode_result(small, 1_000_000) == to_json(small)
    assert await encode_result(large, 10_000_000) == to_json(large)
    with pytest.raises(ResultTooLarge) as info:
        await encode_result(large, 1_000)
    assert 1_000 < info.value.size < 1_000 + 100
    with pytest.raises(ValueError, match="Out of range float values"):
        await encode_result([float("nan")] * (SMALL_RESULT_NODES + 1), 10_000_000)


_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_KEY = st.text(max_size=4) | st.integers() | st.booleans() | st.none() | st.floats()
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_KEY, inner, max_size=4)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=20,
)


def _encoded(encode: Callable[[], bytes]) -> bytes | str:
    try:
        return encode()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__


@settings(max_examples=150, deadline=None)
@given(_VALUE)
def test_one_shot_encoding_is_to_json(value: object) -> None:
    """A small result (one C call, no per-call set-up) encodes to exactly to_json's bytes,
    and fails with the same error type (NaN/infinity, odd keys)."""
    one_shot = _encoded(lambda: anyio.run(encode_result, value, 1_000_000))
    assert one_shot == _encoded(lambda: to_json(value))
