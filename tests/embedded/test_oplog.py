"""Unit tests of the oplog: the clock, resume tokens and the updateDescription diff."""

from __future__ import annotations

import contextlib
import copy
from datetime import datetime
from typing import Any

import anyio
import pytest
from bson import ObjectId
from bson.int64 import Int64
from bson.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from host.embedded.oplog import (
    KIND_EVENT,
    KIND_HIGH_WATER_MARK,
    KIND_INVALIDATE,
    Entry,
    HistoryLost,
    Oplog,
    Position,
    TokenError,
    decode_token,
    encode_token,
    update_description,
)

Doc = dict[str, Any]

positions = st.builds(
    Position,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([KIND_EVENT, KIND_INVALIDATE, KIND_HIGH_WATER_MARK]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),
    st.builds(Int64, st.integers(-(2**63), 2**63 - 1)),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.builds(ObjectId),
)
ids = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.text(min_size=1, max_size=4).filter(lambda k: "\0" not in k), inner, max_size=3
        ),
    ),
    max_leaves=6,
)


@given(positions, st.sampled_from(["insert", "update", "replace", "delete", "drop"]), ids)
def test_token_round_trips_any_id(position: Position, op: str, key_id: Any) -> None:
    """A token decodes to its position and event identity, compound _ids included."""
    token = encode_token(position, op, {"_id": key_id})
    assert set(token) == {"_data"}
    assert token["_data"] == token["_data"].upper()
    decoded, ident = decode_token(token)
    assert decoded == position
    if position.kind == KIND_HIGH_WATER_MARK:
        assert ident is None  # a high-water mark encodes only a time
    else:
        assert ident == {"o": op, "k": {"_id": key_id}}


@given(positions, positions, ids, ids)
def test_tokens_sort_in_position_order(a: Position, b: Position, id_a: Any, id_b: Any) -> None:
    """Tokens of different positions compare as their positions do, whatever the _ids."""
    token_a = encode_token(a, "insert", {"_id": id_a})["_data"]
    token_b = encode_token(b, "insert", {"_id": id_b})["_data"]
    if a < b:
        assert token_a < token_b
    elif a > b:
        assert token_a > token_b


@given(st.one_of(st.text(max_size=30), st.binary(max_size=20).map(bytes.hex), st.integers()))
def test_garbage_tokens_are_rejected(data: Any) -> None:
    """Anything that is not a token this server issued raises TokenError, nothing else."""
    with contextlib.suppress(TokenError):
        decode_token({"_data": data})


def test_token_shapes_rejected() -> None:
    """Non-documents and documents without a string _data are not tokens."""
    for bad in (None, "abc", {"data": "00"}, {"_data": 5}, {"_data": "zz"}):
        with pytest.raises(TokenError):
            decode_token(bad)


def test_clock_strictly_increases() -> None:
    """Every tick is later than the last; advance_to never moves the clock back."""
    oplog = Oplog(max_entries=10)
    times = [oplog.tick() for _ in range(1000)]
    keys = [(t.time, t.inc) for t in times]
    assert keys == sorted(set(keys))
    future = Timestamp(times[-1].time + 100, 5)
    oplog.advance_to(future)
    oplog.advance_to(Timestamp(1, 1))
    assert oplog.last_ts == future
    assert (oplog.tick().time, oplog.tick().inc) > (future.time, future.inc)


def test_oplog_trims_and_reports_history_lost() -> None:
    """A bounded oplog drops its oldest entries; positions before them raise HistoryLost."""
    oplog = Oplog(max_entries=10)
    entries = [oplog.new_entry("insert", "db", "c", key={"_id": i}) for i in range(25)]
    assert len(oplog) <= 10
    assert oplog.trimmed_through is not None
    with pytest.raises(HistoryLost):
        oplog.check_retained(entries[0].position)
    oplog.check_retained(entries[-1].position)
    assert oplog.find(entries[-1].ts) is entries[-1]
    assert oplog.find(entries[0].ts) is None
    with pytest.raises(ValueError, match="not newer"):
        oplog.append(entries[3])


def test_entry_document_round_trip() -> None:
    """Entries survive the journal encoding."""
    oplog = Oplog(max_entries=10)
    entry = oplog.new_entry(
        "update",
        "db",
        "c",
        key={"_id": {"a": 1, "b": [2]}},
        pre={"_id": 1, "x": 1},
        post={"_id": 1, "x": 2},
        images=True,
        extra={"to": {"db": "d", "coll": "e"}},
    )
    again = Entry.from_document(entry.to_document())
    assert again.to_document() == entry.to_document()
    assert isinstance(again.wall, datetime)


@pytest.mark.anyio
async def test_wait_wakes_on_append() -> None:
    """A waiter wakes when an entry is appended; without one it times out with False."""
    oplog = Oplog(max_entries=10)
    assert await oplog.wait(0.01) is False
    woke: list[bool] = []

    async def waiter() -> None:
        woke.append(await oplog.wait(30))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            oplog.new_entry("insert", "db", "c")
    assert woke == [True]


# -- updateDescription ------------------------------------------------------------------

keys = st.sampled_from(["a", "b", "c", "1", "0", "x.y"])
leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text("ab", max_size=2))
values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=5)


def _components(path: str, description: Doc) -> list[str | int]:
    return list(description["disambiguatedPaths"].get(path, path.split(".")))


def _step(node: Any, part: str | int) -> Any:
    return node[int(part)] if isinstance(node, list) else node[part]


def _apply(before: Doc, description: Doc) -> Doc:
    """Apply an updateDescription as a change-stream consumer would."""
    doc = copy.deepcopy(before)
    for truncated in description["truncatedArrays"]:
        parts = _components(truncated["field"], description)
        node: Any = doc
        for part in parts[:-1]:
            node = _step(node, part)
        last = parts[-1]
        key = int(last) if isinstance(node, list) else last
        del node[key][truncated["newSize"] :]
    for path in description["removedFields"]:
        parts = _components(path, description)
        node = doc
        for part in parts[:-1]:
            node = _step(node, part)
        del node[parts[-1]]
    for path, value in description["updatedFields"].items():
        parts = _components(path, description)
        node = doc
        for part in parts[:-1]:
            node = _step(node, part)
        last = parts[-1]
        if isinstance(node, list):
            index = int(last)
            if index == len(node):
                node.append(value)
            else:
                node[index] = value
        else:
            node[last] = value
    return doc


@settings(max_examples=300)
@given(documents, documents)
def test_update_description_reproduces_the_new_document(before: Doc, after: Doc) -> None:
    """Applying the diff to the old document gives the new one, reading ambiguous paths right."""
    description = update_description(before, after, disambiguate=True)
    assert _apply(before, description) == after
    for path in [*description["updatedFields"], *description["removedFields"]]:
        parts = _components(path, description)
        assert ".".join(str(p) for p in parts) == path


@given(documents)
def test_update_description_of_no_change_is_empty(doc: Doc) -> None:
    """An unchanged document has an empty diff."""
    assert update_description(doc, copy.deepcopy(doc)) == {
        "updatedFields": {},
        "removedFields": [],
        "truncatedArrays": [],
    }


def test_update_description_examples() -> None:
    """Dotted paths, removals, truncation; a type change (1 to 1.0, 1 to True) is a change."""
    before = {"_id": 1, "arr": [{"b": 1}, {"b": 2}], "gone": 1, "shrink": [1, 2, 3], "n": 1}
    after = {"_id": 1, "arr": [{"b": 1}, {"b": 5}], "shrink": [1], "n": 1.0}
    assert update_description(before, after) == {
        "updatedFields": {"arr.1.b": 5, "n": 1.0},
        "removedFields": ["gone"],
        "truncatedArrays": [{"field": "shrink", "newSize": 1}],
    }
    assert update_description({"f": 1}, {"f": True})["updatedFields"] == {"f": True}
    assert "disambiguatedPaths" not in update_description({"a": {"1": 1}}, {"a": {"1": 2}})
    assert update_description({"a": {"1": 1}}, {"a": {"1": 2}}, disambiguate=True)[
        "disambiguatedPaths"
    ] == {"a.1": ["a", "1"]}
