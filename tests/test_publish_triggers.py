"""Triggers declared in a plugin file (``TRIGGERS = [...]``) travel with its source on publish."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.publish import PublishError, declared_triggers, publish, publish_file

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


async def test_signing_a_record_with_triggers_is_refused_clearly(db: Db) -> None:
    """publish refuses to sign triggers the signature would not cover (rather than be refused)."""
    with pytest.raises(PublishError, match="cannot sign a record with triggers"):
        await publish(db, "agg", WITH, sign=lambda *_: "x", triggers=[{"collection": "s"}])


async def test_a_bad_declaration_is_refused_at_publish(db: Db) -> None:
    """publish validates TRIGGERS as the hosts would, naming the option, and writes nothing."""
    with pytest.raises(PublishError, match=r"triggers\[0\]\.ordered"):
        await publish(db, "agg", WITH, triggers=[{"collection": "s", "ordered": "sideways"}])
    assert await db.functions.find_one({"_id": "agg"}) is None
