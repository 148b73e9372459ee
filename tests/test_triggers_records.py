"""Trigger declarations: validation of every option, signing, and the self-feeding warning
(with its bounded memory of recent documents)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from host import PluginHost
from host.errors import RecordError
from host.records import TriggerSpec, parse_record
from host.triggers.echo import _KEYS, EchoDetector
from host.triggers.lease import preferred_owner
from host.triggers.window import Window
from host.trust import SignatureVerifier, TrustedKeys, canonical_payload, sign_record
from tests.support import Db, drain, next_event, wait_until
from tests.triggers_support import FAST, record, wait_running

SOURCE = "async def on_change(ctx, event):\n    pass\n"


def parse(*triggers: Any) -> tuple[TriggerSpec, ...]:
    """Parse a record with ``triggers``."""
    return parse_record({"_id": "p", "source": SOURCE, "triggers": list(triggers)}).triggers


def test_defaults_fill_every_option() -> None:
    """A trigger naming only its collection gets the contract's defaults."""
    (spec,) = parse({"collection": "orders"})
    assert spec.as_document() == {
        "name": "orders",
        "collection": "orders",
        "operations": ["insert", "update", "replace", "delete"],
        "match": None,
        "project": None,
        "full_document": "default",
        "entrypoint": "on_change",
        "ordered": "per_key",
        "max_concurrency": 64,
        "max_attempts": 5,
        "on_history_lost": "resume_from_now",
        "start_at": None,
    }


def test_every_option_is_kept() -> None:
    """Every option given is parsed to its value (operations in the canonical order)."""
    start = datetime(2026, 1, 2, 3, 4, 5)
    (spec,) = parse(
        {
            "name": "big",
            "collection": "orders",
            "operations": ["update", "insert"],
            "match": {"fullDocument.total": {"$gt": 10}},
            "project": {"fullDocument": 1},
            "full_document": "updateLookup",
            "entrypoint": "handle",
            "ordered": "total",
            "max_concurrency": 10_000,
            "max_attempts": 1,
            "on_history_lost": "rescan",
            "start_at": start,
        }
    )
    assert spec.operations == ("insert", "update")
    assert dict(spec.match or {}) == {"fullDocument.total": {"$gt": 10}}
    assert (spec.name, spec.entrypoint, spec.ordered, spec.full_document) == (
        "big",
        "handle",
        "total",
        "updateLookup",
    )
    assert (spec.max_concurrency, spec.max_attempts, spec.on_history_lost) == (10_000, 1, "rescan")
    assert spec.start_at == start


@pytest.mark.parametrize(
    ("triggers", "field", "words"),
    [
        ({"collection": "orders"}, "triggers", "list"),
        (["orders"], "triggers[0]", "document"),
        ([{}], "triggers[0].collection", "required"),
        ([{"collection": "a$b"}], "triggers[0].collection", "'$'"),
        ([{"collection": "system.views"}], "triggers[0].collection", "system."),
        ([{"collection": "functions_triggers"}], "triggers[0].collection", "bookkeeping"),
        ([{"collection": "o", "operations": []}], "triggers[0].operations", "non-empty"),
        ([{"collection": "o", "operations": ["drop"]}], "triggers[0].operations", "'drop'"),
        ([{"collection": "o", "match": [1]}], "triggers[0].match", "document"),
        ([{"collection": "o", "project": "x"}], "triggers[0].project", "document"),
        ([{"collection": "o", "full_document": "all"}], "triggers[0].full_document", "'all'"),
        ([{"collection": "o", "entrypoint": "not valid"}], "triggers[0].entrypoint", "identifier"),
        ([{"collection": "o", "ordered": "sometimes"}], "triggers[0].ordered", "per_key"),
        ([{"collection": "o", "max_concurrency": 0}], "triggers[0].max_concurrency", "1 to"),
        ([{"collection": "o", "max_concurrency": 10_001}], "triggers[0].max_concurrency", "1 to"),
        ([{"collection": "o", "max_concurrency": True}], "triggers[0].max_concurrency", "integer"),
        ([{"collection": "o", "max_attempts": 1.5}], "triggers[0].max_attempts", "integer"),
        ([{"collection": "o", "on_history_lost": "ignore"}], "triggers[0].on_history_lost", "fail"),
        ([{"collection": "o", "start_at": "yesterday"}], "triggers[0].start_at", "date"),
        ([{"collection": "o", "ordred": "total"}], "triggers[0].ordred", "not a trigger option"),
        ([{"collection": "o", "name": "a/b"}], "triggers[0].name", "letters"),
        ([{"collection": "o"}, {"collection": "o"}], "triggers[1].name", "twice"),
    ],
)
def test_a_bad_trigger_is_refused_naming_the_option(triggers: Any, field: str, words: str) -> None:
    """Each invalid option refuses the record with an error naming triggers[i].option."""
    doc = {"_id": "p", "source": SOURCE, "triggers": triggers}
    with pytest.raises(RecordError) as caught:
        parse_record(doc)
    assert caught.value.name == "p"
    assert caught.value.field == field
    assert words in caught.value.reason


def test_old_signatures_stay_valid_and_triggers_are_signed() -> None:
    """No triggers: the four-field payload; with triggers, changing one breaks the signature."""
    key = Ed25519PrivateKey.generate()
    verifier = SignatureVerifier(TrustedKeys([key.public_key()]))
    plain = parse_record({"_id": "p", "source": SOURCE, "revision": 1})
    assert canonical_payload("p", SOURCE, "main", 1) == canonical_payload(
        "p", SOURCE, "main", 1, plain.triggers
    )
    assert b"triggers" not in canonical_payload("p", SOURCE, "main", 1)
    triggers = [{"collection": "orders", "max_attempts": 3}]
    specs = parse(*triggers)
    signature = sign_record(key, "p", SOURCE, "main", 2, specs)
    signed = {"_id": "p", "source": SOURCE, "revision": 2, "signature": signature}
    verifier(parse_record({**signed, "triggers": triggers}), None)  # accepted
    tampered = {**signed, "triggers": [{"collection": "orders", "max_attempts": 4}]}
    with pytest.raises(RecordError, match="altered after signing"):
        SignatureVerifier(TrustedKeys([key.public_key()]))(parse_record(tampered), None)
    with pytest.raises(RecordError, match="altered after signing"):  # triggers added
        SignatureVerifier(TrustedKeys([key.public_key()]))(
            parse_record({**signed, "triggers": [*triggers, {"collection": "x"}]}), None
        )


@settings(deadline=None)  # no timing is asserted in tests (a loaded machine took 277 ms)
@given(st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=40), st.randoms())
def test_the_watermark_never_passes_an_unfinished_event(keys: list[int], rnd: Any) -> None:
    """Finishing events per key in any interleaving: the checkpoint is always the last event
    of the longest finished prefix, and done_ahead lists exactly the finished ones after it."""
    window = Window(capacity=1000)
    for seq, key in enumerate(keys):
        window.add(key, {"n": seq}, {"_data": str(seq)})
    finished: set[int] = set()
    while len(finished) < len(keys):
        pending = [k for k in set(keys) if window.head(k) is not None]
        slot = window.head(rnd.choice(pending))
        assert slot is not None
        window.finish(slot)
        finished.add(int(slot.event["n"]))
        prefix = 0
        while prefix in finished:
            prefix += 1
        expected = None if prefix == 0 else {"_data": str(prefix - 1)}
        assert window.checkpoint == expected
        assert window.done_ahead() == [{"_data": str(n)} for n in sorted(finished) if n >= prefix]
        # per key: a key's finished events are a prefix of its events (order per key)
        for key in set(keys):
            mine = [n for n, k in enumerate(keys) if k == key]
            done = [n for n in mine if n in finished]
            assert done == mine[: len(done)]


SELF_FEEDING = """
async def on_change(ctx, event):
    doc = event["fullDocument"]
    if doc["n"] < 15:
        await ctx.db.loop.update_one({"_id": doc["_id"]}, {"$inc": {"n": 1}})
"""

ELSEWHERE = """
async def on_change(ctx, event):
    await ctx.db.seen.insert_one({"key": event["documentKey"]["_id"]})
"""


@pytest.mark.anyio
async def test_a_trigger_writing_its_own_document_is_warned_about(db: Db) -> None:
    """A handler updating the document it was called for: trigger.recursion_suspected."""
    trigger = {"collection": "loop", "full_document": "updateLookup"}
    await db.functions.insert_one(record("self", SELF_FEEDING, trigger))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "self/loop")
        await db.loop.insert_one({"_id": 1, "n": 0})
        warned = await next_event(events, "trigger.recursion_suspected")

        async def converged() -> bool:
            doc = await db.loop.find_one({"_id": 1})
            return doc is not None and doc["n"] == 15

        await wait_until(converged, "the self-feeding handler stopped at n == 15")
    assert warned["trigger"] == "self/loop" and warned["chain"] >= 10


@pytest.mark.anyio
async def test_a_trigger_writing_elsewhere_is_not_warned_about(db: Db) -> None:
    """A handler writing another collection, over many documents: no recursion warning."""
    await db.functions.insert_one(record("other", ELSEWHERE, {"collection": "src"}))
    host = PluginHost(db, triggers=FAST)
    async with host.events() as events, host:
        await wait_running(db, "other/src")
        await db.src.insert_many([{"_id": i} for i in range(100)])

        async def all_seen() -> bool:
            return await db.seen.count_documents({}) == 100

        await wait_until(all_seen, "every insert handled")
        seen = [event.event for event in await drain(events)]
    assert "trigger.recursion_suspected" not in seen
    assert "trigger.started" in seen  # the subscription did see the trigger's events


@settings(deadline=None)  # no timing is asserted in tests
@given(
    st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=30),
    st.lists(st.integers(min_value=0, max_value=4), max_size=10),
    st.randoms(),
)
def test_the_checkpoint_passes_a_rescan_only_once_all_of_it_is_done(
    during: list[int], after: list[int], rnd: Any
) -> None:
    """Rescan documents and events read meanwhile enter tokenless, then the end mark: the
    checkpoint stays put until every one of them is done, then reaches the mark."""
    window = Window(capacity=1000)
    old = {"_data": "old"}
    window.checkpoint = old
    for seq, key in enumerate(during):  # the rescan's and the stream's, interleaved
        window.add(key, {"n": seq}, None)
    window.mark({"_data": "end"})
    for seq, key in enumerate(after, start=len(during)):
        window.add(key, {"n": seq}, {"_data": str(seq)})
    finished: set[int] = set()
    total = len(during) + len(after)
    while len(finished) < total:
        pending = [k for k in set(during + after) if window.head(k) is not None]
        slot = window.head(rnd.choice(pending))
        assert slot is not None
        window.finish(slot)
        finished.add(int(slot.event["n"]))
        if not set(range(len(during))) <= finished:
            assert window.checkpoint == old  # nothing of the rescan's phase is covered yet
        else:
            assert window.checkpoint is not None and window.checkpoint != old
    assert window.checkpoint == ({"_data": str(total - 1)} if after else {"_data": "end"})


SELF_INSERTING = """
async def on_change(ctx, event):
    key = event["documentKey"]["_id"]
    if key < 15:
        await ctx.db.loop.insert_one({"_id": key + 1})  # a new document: a new key each time
"""

MARKS_ONCE = """
async def on_change(ctx, event):
    doc = event["fullDocument"]
    if not doc.get("marked"):
        await ctx.db.loop.update_one({"_id": doc["_id"]}, {"$set": {"marked": True}})
"""


@pytest.mark.anyio
async def test_a_trigger_inserting_into_its_own_collection_is_warned_about(db: Db) -> None:
    """A handler inserting a new document into the collection it watches, each event: warned."""
    await db.functions.insert_one(record("ins", SELF_INSERTING, {"collection": "loop"}))
    async with PluginHost(db, triggers=FAST) as host, host.events() as events:
        await wait_running(db, "ins/loop")
        await db.loop.insert_one({"_id": 0})
        warned = await next_event(events, "trigger.recursion_suspected")

        async def converged() -> bool:
            return await db.loop.count_documents({}) == 16

        await wait_until(converged, "the self-inserting handler stopped at _id 15")
    assert warned["trigger"] == "ins/loop" and warned["chain"] >= 10


@pytest.mark.anyio
async def test_a_trigger_marking_its_own_document_once_is_not_warned_about(db: Db) -> None:
    """A handler writing its own document once per document (chain 1, over 100): no warning."""
    trigger = {"collection": "loop", "full_document": "updateLookup"}
    await db.functions.insert_one(record("mark", MARKS_ONCE, trigger))
    host = PluginHost(db, triggers=FAST)
    async with host.events() as events, host:
        await wait_running(db, "mark/loop")
        await db.loop.insert_many([{"_id": i} for i in range(100)])

        async def all_marked() -> bool:
            return await db.loop.count_documents({"marked": True}) == 100

        await wait_until(all_marked, "every document marked")
        doc = await wait_until_state_processed(db, "mark/loop", 200)
        seen = [event.event for event in await drain(events)]
    assert doc["processed"] >= 200  # the inserts and the marks' own events were handled
    assert "trigger.recursion_suspected" not in seen


async def wait_until_state_processed(db: Db, tid: str, count: int) -> Any:
    """The trigger's state document once it counts ``count`` events processed."""
    found: list[Any] = []

    async def processed() -> bool:
        doc = await db.functions_triggers.find_one({"_id": tid})
        found[:] = [doc]
        return doc is not None and doc.get("processed", 0) >= count

    await wait_until(processed, f"{tid} processed {count} events")
    return found[0]


@given(
    st.sets(st.text(alphabet="abcdef", min_size=1, max_size=4), min_size=2, max_size=6),
    st.integers(min_value=0, max_value=5),
)
def test_rendezvous_moves_only_the_triggers_of_a_leaving_host(hosts: set[str], pick: int) -> None:
    """Removing one host reassigns only the triggers it was preferred for."""
    leaving = sorted(hosts)[pick % len(hosts)]
    rest = hosts - {leaving}
    for n in range(50):
        tid = f"p/t{n}"
        before = preferred_owner(tid, hosts)
        after = preferred_owner(tid, rest)
        assert before in hosts and after in rest
        if before != leaving:
            assert after == before


def test_echo_marks_keep_the_newest_documents_and_forget_the_oldest() -> None:
    """Past 4,096 documents the echo check still knows the newest ones' runs (and the
    keys their handlers wrote) and has forgotten the oldest ones', at most 8,192 kept."""
    echo = EchoDetector(threshold=10)
    wall = datetime(2026, 1, 1, 12, 0, 0, 500_000)  # naive, as PyMongo decodes wallTime
    at = wall.replace(tzinfo=UTC).timestamp()
    total = 3 * _KEYS + 123
    for key in range(total):
        echo.handled(key, at - 1.0, at + 1.0, 3)  # each run spans the wallTime below
    event = {"wallTime": wall}
    newest = range(total - _KEYS, total)
    assert all(echo.check(key, event) == 4 for key in newest)  # each continues its chain
    remembered = [key for key in range(total) if echo.check(key, event)]
    assert remembered[-_KEYS:] == list(newest)
    assert _KEYS <= len(remembered) <= 2 * _KEYS
    assert echo.check(0, event) == 0  # the oldest run is forgotten: no chain
    # Keys written by handlers: the same bound; a noted key continues the writer's chain
    # once (the mark is used up by the event it caused).
    echo.wrote(range(total), chain=6)
    assert all(echo.check(key, {}) == 7 for key in range(total - _KEYS, total))
    assert echo.check(total - 1, {}) == 0
    assert echo.check(0, {}) == 0
