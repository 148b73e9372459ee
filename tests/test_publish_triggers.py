"""Triggers declared in a plugin file (``TRIGGERS = [...]``) travel with its source on publish."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from host.errors import RecordError
from host.publish import (
    PublishError,
    declared_triggers,
    get_record,
    publish,
    publish_file,
    rollback,
)
from host.records import parse_record
from host.trust import SignatureVerifier, TrustedKeys, sign_record

from .support import Db

pytestmark = pytest.mark.anyio

WITH = 'TRIGGERS = [{"collection": "sales"}]\n\nasync def on_change(ctx, event):\n    pass\n'
WITHOUT = "async def main(ctx, args):\n    return 1\n"


def test_declared_triggers_reads_only_a_top_level_literal() -> None:
    """A top-level literal list is read; none is []; anything computed is refused by name."""
    assert declared_triggers(WITH) == [{"collection": "sales"}]
    assert declared_triggers(WITHOUT) == []
    assert declared_triggers("def f():\n    TRIGGERS = [{'a': 1}]\n") == []
    for bad in ("TRIGGERS = make()\n", "TRIGGERS = {'collection': 'x'}\n", "TRIGGERS = [1]\n"):
        with pytest.raises(PublishError, match=r"TRIGGERS \(line 1\) must be a literal list"):
            declared_triggers(bad, "agg")


async def test_publish_file_writes_changes_and_removes_triggers(db: Db, tmp_path: Path) -> None:
    """The triggers are written with the revision; a change republishes; removing them unsets."""
    path = tmp_path / "agg.py"
    path.write_text(WITH)
    first = await publish_file(db, path)
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and record["triggers"] == [{"collection": "sales"}]
    assert (await publish_file(db, path)).changed is False
    path.write_text(WITH.replace('"sales"', '"orders"'))
    second = await publish_file(db, path)
    assert second.revision == first.revision + 1
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and record["triggers"] == [{"collection": "orders"}]
    path.write_text(WITHOUT)
    await publish_file(db, path)
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and "triggers" not in record


async def test_a_signed_record_with_triggers_verifies_and_covers_them(db: Db) -> None:
    """publish signs the triggers with the source; a host accepts it and refuses a changed one."""
    key = Ed25519PrivateKey.generate()
    verify = SignatureVerifier(TrustedKeys([key.public_key()]))
    sign = functools.partial(sign_record, key)
    await publish(db, "agg", WITH, sign=sign, triggers=[{"collection": "sales"}])
    doc = await db.functions.find_one({"_id": "agg"})
    assert doc is not None
    verify(parse_record(doc), None)  # the signature covers what was written
    # An unchanged republish keeps the revision (the same key signs the same content alike).
    assert (await publish(db, "agg", WITH, sign=sign)).changed is False
    tampered = {**doc, "triggers": [{"collection": "orders"}]}
    with pytest.raises(RecordError, match="signature"):
        verify(parse_record(tampered), None)


async def test_a_bad_declaration_is_refused_at_publish(db: Db) -> None:
    """publish validates TRIGGERS as the hosts would, naming the option, and writes nothing."""
    with pytest.raises(PublishError, match=r"triggers\[0\]\.ordered"):
        await publish(db, "agg", WITH, triggers=[{"collection": "s", "ordered": "sideways"}])
    assert await db.functions.find_one({"_id": "agg"}) is None


async def test_rollback_restores_the_revisions_triggers(db: Db) -> None:
    """A rollback brings back the triggers of the revision it restores, or none if it had none."""
    first = await publish(db, "agg", WITH, triggers=[{"collection": "sales"}])
    await publish(db, "agg", WITH + "\n# 2\n", triggers=[{"collection": "orders"}])
    await publish(db, "agg", WITHOUT, triggers=[])
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and "triggers" not in record

    back, source_rev = await rollback(db, "agg", to=first.revision)
    assert source_rev == first.revision
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and record["revision"] == back.revision
    assert record["triggers"] == [{"collection": "sales"}]
    # The restored revision is itself in the history with its triggers.
    entry = await get_record(db, "agg", revision=back.revision)
    assert entry["triggers"] == [{"collection": "sales"}]

    await rollback(db, "agg", to=first.revision + 2)  # the one without triggers
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and "triggers" not in record


async def test_rollback_to_an_entry_without_a_triggers_field_keeps_the_records(db: Db) -> None:
    """A history entry written before the history kept triggers leaves the record's as they are."""
    first = await publish(db, "agg", WITH, triggers=[{"collection": "sales"}])
    await publish(db, "agg", WITH + "\n# 2\n")  # triggers kept: sales
    await db.functions_history.update_one(
        {"name": "agg", "revision": first.revision}, {"$unset": {"triggers": ""}}
    )
    await rollback(db, "agg", to=first.revision)
    record = await db.functions.find_one({"_id": "agg"})
    assert record is not None and record["triggers"] == [{"collection": "sales"}]
    assert record["source"] == WITH
