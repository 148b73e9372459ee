"""Tests for host.publish: revisions, history, rollback, enable/disable, delete, folders."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from host import PluginHost
from host.publish import (
    Published,
    PublishError,
    UnknownPlugin,
    UnknownRevision,
    delete,
    get_record,
    history,
    list_records,
    plugin_files,
    publish,
    publish_dir,
    publish_file,
    rollback,
    set_enabled,
)
from tests.support import Doc

from .support import wait_until

pytestmark = pytest.mark.anyio


def src(value: object) -> str:
    """A plugin returning ``value``."""
    return f"async def main(ctx, args):\n    return {value!r}\n"


async def test_publish_inserts_then_increments(db: AsyncDatabase[Doc]) -> None:
    """The first publish creates revision 1 with timestamps; the next one revision 2."""
    first = await publish(db, "greet", src(1))
    second = await publish(db, "greet", src(2))
    assert first == Published("greet", 1, changed=True, created=True)
    assert second == Published("greet", 2, changed=True, created=False)
    record = await get_record(db, "greet")
    assert record["source"] == src(2)
    assert record["revision"] == 2
    assert record["createdAt"] <= record["updatedAt"]


async def test_unchanged_source_is_not_republished(db: AsyncDatabase[Doc]) -> None:
    """Publishing the same source again writes nothing unless forced."""
    await publish(db, "greet", src(1))
    again = await publish(db, "greet", src(1))
    forced = await publish(db, "greet", src(1), force=True)
    assert again == Published("greet", 1, changed=False)
    assert forced.revision == 2
    assert forced.changed


async def test_history_records_every_revision(db: AsyncDatabase[Doc]) -> None:
    """Each publish appends {name, revision, source, entrypoint, publishedAt, triggers}."""
    await publish(db, "greet", src(1))
    await publish(db, "greet", "def handler(ctx, args):\n    return 2\n", entrypoint="handler")
    entries = await history(db, "greet")
    assert [e["revision"] for e in entries] == [2, 1]
    assert entries[0]["entrypoint"] == "handler"
    assert entries[1]["entrypoint"] == "main"
    assert set(entries[0]) == {
        "name",
        "revision",
        "source",
        "entrypoint",
        "publishedAt",
        "triggers",
    }
    assert entries[0]["triggers"] == []  # none declared (a rollback to it removes any)
    assert (await get_record(db, "greet", revision=1))["source"] == src(1)
    assert (await db.functions_history.count_documents({})) == 2


async def test_entrypoint_is_kept_when_not_given(db: AsyncDatabase[Doc]) -> None:
    """A publish without an entrypoint keeps the record's entrypoint."""
    await publish(db, "h", "def handler(ctx, args):\n    return 1\n", entrypoint="handler")
    await publish(db, "h", "def handler(ctx, args):\n    return 2\n")
    assert (await get_record(db, "h"))["entrypoint"] == "handler"


@pytest.mark.parametrize(
    ("name", "source", "entrypoint", "message"),
    [
        ("bad name", src(1), None, "invalid plugin name"),
        ("ok", "   ", None, "empty"),
        ("ok", "def main(:\n", None, "syntax error on line 1"),
        ("ok", src(1), "not-an-identifier", "not a Python identifier"),
    ],
)
async def test_invalid_input_is_refused(
    db: AsyncDatabase[Doc], name: str, source: str, entrypoint: str | None, message: str
) -> None:
    """Bad names, empty source, syntax errors and bad entrypoints are refused, nothing written."""
    with pytest.raises(PublishError, match=message):
        await publish(db, name, source, entrypoint=entrypoint)
    assert await db.functions.count_documents({}) == 0


async def test_concurrent_publishes_get_distinct_revisions(db: AsyncDatabase[Doc]) -> None:
    """Racing publishers never reuse a revision: the compare-and-set makes losers retry."""
    outcomes: list[Published] = []

    async def one(i: int) -> None:
        outcomes.append(await publish(db, "race", src(i)))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    assert sorted(p.revision for p in outcomes) == list(range(1, 9))
    assert (await get_record(db, "race"))["revision"] == 8


async def test_rollback_publishes_a_new_higher_revision(db: AsyncDatabase[Doc]) -> None:
    """Rollback republishes an old source as a new revision: revisions only go up."""
    for i in (1, 2, 3):
        await publish(db, "greet", src(i))
    back, source_rev = await rollback(db, "greet")
    assert (back.revision, source_rev) == (4, 2)
    assert (await get_record(db, "greet"))["source"] == src(2)
    to_first, source_rev = await rollback(db, "greet", to=1)
    assert (to_first.revision, source_rev) == (5, 1)
    assert (await get_record(db, "greet"))["source"] == src(1)


async def test_rollback_errors(db: AsyncDatabase[Doc]) -> None:
    """Rolling back an unknown plugin, a missing revision or a first revision says why."""
    with pytest.raises(UnknownPlugin):
        await rollback(db, "ghost")
    await publish(db, "greet", src(1))
    with pytest.raises(UnknownRevision, match="has no previous revision"):
        await rollback(db, "greet")
    with pytest.raises(UnknownRevision, match=r"have: 1"):
        await rollback(db, "greet", to=9)


async def test_delete_keeps_history_and_revisions_keep_rising(db: AsyncDatabase[Doc]) -> None:
    """After a delete, rollback restores the plugin and a re-publish continues the revisions."""
    await publish(db, "greet", src(1))
    await publish(db, "greet", src(2))
    await delete(db, "greet")
    with pytest.raises(UnknownPlugin):
        await get_record(db, "greet")
    restored, source_rev = await rollback(db, "greet")
    assert (restored.revision, source_rev) == (3, 2)
    await delete(db, "greet")
    again = await publish(db, "greet", src(9))
    assert again.revision == 4
    with pytest.raises(UnknownPlugin):
        await delete(db, "nothing")


async def test_enable_disable(db: AsyncDatabase[Doc]) -> None:
    """set_enabled flips the record's enabled flag; unknown names raise UnknownPlugin."""
    await publish(db, "greet", src(1))
    await set_enabled(db, "greet", False)
    assert (await list_records(db))[0]["enabled"] is False
    await set_enabled(db, "greet", True)
    assert (await list_records(db))[0]["enabled"] is True
    with pytest.raises(UnknownPlugin):
        await set_enabled(db, "nope", True)


async def test_blog_shaped_record_is_upgraded(db: AsyncDatabase[Doc]) -> None:
    """Publishing over a {_id, fn} record replaces 'fn' with 'source'."""
    await db.functions.insert_one({"_id": "old", "fn": src(0)})
    published = await publish(db, "old", src(1))
    record = await get_record(db, "old")
    assert published.revision == 1
    assert "fn" not in record
    assert record["source"] == src(1)


async def test_publish_dir_and_files(db: AsyncDatabase[Doc], tmp_path: Path) -> None:
    """A folder publishes NAME.py files; a bad file is reported without stopping the rest."""
    (tmp_path / "a.py").write_text(src("a"))
    (tmp_path / "b.py").write_text("def main(:\n")
    (tmp_path / "_helper.py").write_text(src("h"))
    (tmp_path / "notes.txt").write_text("not a plugin")
    seen: list[str] = []
    outcomes = await publish_dir(db, tmp_path, on_progress=lambda name, _: seen.append(name))
    assert seen == ["a", "b"]
    assert isinstance(outcomes[0], Published)
    assert isinstance(outcomes[1], PublishError)
    assert [r["name"] for r in await list_records(db)] == ["a"]
    files = await anyio.to_thread.run_sync(plugin_files, tmp_path)
    assert [name for name, _ in files] == ["a", "b"]
    with pytest.raises(PublishError, match="does not exist"):
        await publish_file(db, tmp_path / "missing.py")
    with pytest.raises(PublishError, match="does not exist"):
        await publish_dir(db, tmp_path / "nowhere")


async def test_published_versions_reach_a_host(db: AsyncDatabase[Doc]) -> None:
    """What publish writes goes live in a running host; disable unloads, rollback restores."""
    await publish(db, "greet", src(1))
    async with PluginHost(db) as host:
        assert await host.call("greet") == 1
        await publish(db, "greet", src(2))
        await wait_until(lambda: host.plugin("greet").revision == 2, "revision 2 serves")  # type: ignore[union-attr]
        assert await host.call("greet") == 2
        await set_enabled(db, "greet", False)
        await wait_until(lambda: host.current("greet") is None, "greet is unloaded")
        await set_enabled(db, "greet", True)
        await rollback(db, "greet")
        await wait_until(lambda: host.plugin("greet").revision == 3, "the rollback serves")  # type: ignore[union-attr]
        assert await host.call("greet") == 1
