"""JSON on the HTTP wire: strict parsing of request bodies and bounded encoding of results.

Parsing refuses NaN/Infinity and turns too-deep nesting into a ``ValueError`` (a 400, not a
500); with the ``speed`` extra it uses orjson. Encoding spells the BSON types plugins get back
from ``ctx.db`` in their usual JSON form, refuses results over the configured size, and
encodes large results in steps between loop turns so one big reply cannot stall the loop.
Split out of ``host.http`` so the call route and the encoders each stay one concept.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
import anyio.lowlevel
from bson import Decimal128, ObjectId

__all__ = (
    "SMALL_RESULT_NODES",
    "ResultEncodingTimeout",
    "ResultTooLarge",
    "encode_result",
    "parse_json",
    "to_json",
)


def _default(value: Any) -> Any:
    # The BSON types plugins get back from ctx.db, in their usual JSON (Extended JSON
    # relaxed-ish) spelling; anything else is a plugin bug reported as such.
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, ObjectId | uuid.UUID):
        return str(value)
    if isinstance(value, Decimal128):
        return str(value.to_decimal())
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        # Sorted when the members order naturally (strings, or numbers); otherwise in
        # iteration order. Never by repr(): a plugin's slow __repr__ once held the loop
        # for seconds, outside any timeout.
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def to_json(value: Any) -> bytes:
    """Encode a call result: JSON, plus dates, ObjectIds and decimals as strings.

    Raises:
        TypeError: The value holds something JSON cannot express.
        ValueError: The value holds NaN or infinity.
    """
    return json.dumps(value, default=_default, allow_nan=False, ensure_ascii=False).encode()


class ResultTooLarge(ValueError):
    """A result's JSON passed the size limit (``size`` bytes encoded when it stopped)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"over the limit after {size} bytes")
        self.size = size


class ResultEncodingTimeout(TimeoutError):
    """Encoding a result did not finish within what was left of the call's timeout."""


SMALL_RESULT_NODES = 2_048
"""Results with at most this many containers and scalars are encoded in one C call."""
_ENCODE_STEP = 4_096  # chunks of the pure-Python encoder between two loop turns


_SCALARS = frozenset({int, float, bool, type(None)})


def _is_small(value: Any, limit: int) -> bool:
    # Counts at most SMALL_RESULT_NODES nodes: a bounded look, cheap for the usual result.
    # Only containers go on the stack: each container's children are counted in bulk
    # (len) and looked at in one loop, where exact strings and scalars (the bulk of the
    # JSON a plugin returns) cost one type() test each. Everything else (subclasses,
    # bytes, sets, objects) goes on the stack and takes the isinstance() branches.
    budget = SMALL_RESULT_NODES
    text = 0
    stack = [value]
    pop = stack.pop
    push = stack.append
    while stack:
        item = pop()
        kind = type(item)
        children: Any
        if kind is dict or isinstance(item, dict):
            budget -= 2 * len(item)  # keys and values
            if budget < 0:
                return False
            for key in item:
                if type(key) is str or isinstance(key, str):
                    text += len(key)
            children = item.values()
        elif kind is list or kind is tuple or isinstance(item, list | tuple | set | frozenset):
            budget -= len(item)
            if budget < 0:
                return False
            children = item
        elif kind is str or isinstance(item, str | bytes):
            text += len(item)
            if text * 6 > limit:  # a character can take 6 bytes as JSON (\u escapes)
                return False
            continue
        else:
            continue
        for child in children:
            child_kind = type(child)
            if child_kind is str:
                text += len(child)
            elif child_kind not in _SCALARS:
                push(child)
        if text * 6 > limit:
            return False
    return True


def _one_shot_encoder() -> Callable[[Any], bytes]:
    """:func:`to_json` for a value :func:`_is_small` passed, without its per-call set-up.

    ``json.dumps`` with options builds a ``JSONEncoder`` and a C encoder on every call,
    which costs more than encoding a small result. This C encoder is built once, with
    the same options; it keeps no circular-reference markers, which is safe only here: a
    cyclic value never passes the bounded walk (its nodes never run out).
    """
    # Private names of json.encoder (the accelerator json.dumps itself uses).
    make = getattr(json.encoder, "c_make_encoder", None)
    quote = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or quote is None:  # pragma: no cover - no _json accelerator
        return to_json
    # (markers, default, quote, indent, key separator, item separator, sort_keys,
    # skipkeys, allow_nan): json.dumps(default=_default, allow_nan=False,
    # ensure_ascii=False) but for the markers.
    encode = make(None, _default, quote, None, ": ", ", ", False, False, False)

    def one_shot(value: Any) -> bytes:
        if isinstance(value, str):  # the C encoder's entry point takes containers and scalars
            return to_json(value)
        return "".join(encode(value, 0)).encode()

    return one_shot


_encode_small = _one_shot_encoder()


async def encode_result(value: Any, limit: int, deadline: float | None = None) -> bytes:
    """Encode a call result like :func:`to_json`, bounded in size and in time.

    A small result (a bounded look says so) is encoded in one C call. A large one is
    encoded in chunks by the pure-Python encoder, the loop getting a turn between steps,
    and it stops as soon as the JSON passes ``limit`` bytes or ``deadline`` passes, so a
    huge or pathological result can neither stall the loop nor outlive the call's timeout.

    Args:
        value: The result.
        limit: Largest accepted JSON, in bytes.
        deadline: ``time.perf_counter()`` by which encoding must be done (None: no bound).

    Returns:
        The JSON (at most ``limit`` bytes).

    Raises:
        ResultTooLarge: The JSON passed ``limit``.
        ResultEncodingTimeout: The deadline passed while encoding.
        TypeError: The value holds something JSON cannot express.
        ValueError: The value holds NaN or infinity.
    """
    if _is_small(value, limit):
        content = _encode_small(value)
        if len(content) > limit:
            raise ResultTooLarge(len(content))
        return content
    encoder = json.JSONEncoder(default=_default, allow_nan=False, ensure_ascii=False)
    parts: list[bytes] = []
    size = 0
    for n, chunk in enumerate(encoder.iterencode(value), 1):
        data = chunk.encode()
        size += len(data)
        if size > limit:
            raise ResultTooLarge(size)
        parts.append(data)
        if n % _ENCODE_STEP == 0:
            if deadline is not None and time.perf_counter() > deadline:
                raise ResultEncodingTimeout("encoding the result took past the call's timeout")
            await anyio.lowlevel.checkpoint()
    return b"".join(parts)


class _BadConstant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _BadConstant(f"{name} is not valid JSON")


def _parse_json_stdlib(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def _parse_json_fast(body: bytes) -> Any:
    # orjson refuses NaN/Infinity itself and stops at 1,024 levels of nesting, raising
    # orjson.JSONDecodeError (a ValueError) for every bad body.
    return orjson.loads(body)


try:  # the ``speed`` extra: about 10x faster than the standard library on small bodies
    import orjson
except ImportError:  # pragma: no cover - the pure-Python fallback
    parse_json: Callable[[bytes], Any] = _parse_json_stdlib
else:
    parse_json = _parse_json_fast
"""Strict JSON: NaN/Infinity refused; too-deep nesting is a ValueError, not a 500."""
