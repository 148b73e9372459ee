"""Tests for host.devsync: `plugin-host dev` publishing a plugin folder as files change."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from host.devsync import sync_folder, sync_path
from tests.support import Db, wait_until

pytestmark = pytest.mark.anyio


async def test_sync_path_publishes_then_deletes(db: Db, tmp_path: Path) -> None:
    """A plugin file is published once per change; a deleted file deletes its record."""
    path = tmp_path / "hello.py"
    path.write_text("async def main(ctx, args):\n    return 1\n")
    await sync_path(db, path)
    first = await db.functions.find_one({"_id": "hello"})
    assert first is not None and first["revision"] == 1
    await sync_path(db, path)  # unchanged: no new revision
    again = await db.functions.find_one({"_id": "hello"})
    assert again is not None and again["revision"] == 1
    path.unlink()
    await sync_path(db, path)
    assert await db.functions.find_one({"_id": "hello"}) is None


async def test_sync_path_ignores_non_plugins_and_survives_bad_source(
    db: Db, tmp_path: Path
) -> None:
    """Files that are not plugins are ignored; a file that does not compile is not published."""
    helper = tmp_path / "_helper.py"
    helper.write_text("x = 1\n")
    await sync_path(db, helper)
    broken = tmp_path / "broken.py"
    broken.write_text("def main(:\n")
    await sync_path(db, broken)
    assert await db.functions.count_documents({}) == 0


async def test_sync_folder_publishes_saves_until_stopped(db: Db, tmp_path: Path) -> None:
    """A save in the watched folder reaches the collection; setting stop ends the sync."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: sync_folder(db, tmp_path, stop, debounce_ms=50, step_ms=5))
        target = tmp_path / "live.py"

        async def published() -> bool:
            # Rewritten on every poll: a save before the watch started would be missed.
            target.write_text("async def main(ctx, args):\n    return 2\n")
            return await db.functions.find_one({"_id": "live"}) is not None

        await wait_until(published, "the saved file was published")
        stop.set()
