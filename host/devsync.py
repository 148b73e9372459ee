"""Dev mode's folder sync: publish a plugin file into the collection every time it is saved.

The sync goes through :mod:`host.publish`, exactly like ``plugin-host push``, so an edit
travels the production path: file → collection → change stream → compile → swap. Files
are watched with OS notifications (``watchfiles``: inotify, FSEvents...), never polled.

``name.py`` publishes plugin ``name``; deleting the file deletes the record. Saving a
file with a syntax error publishes nothing and logs ``dev.publish_failed``: the version
that was serving keeps serving.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import structlog
import watchfiles

from .publish import PublishError, Signer, UnknownPlugin, delete, plugin_name, publish_file

__all__ = ("sync_folder", "sync_path")

_log = structlog.get_logger("host.dev")


async def sync_path(
    db: Any, path: str | Path, *, collection: str = "functions", sign: Signer | None = None
) -> None:
    """Bring the record of one plugin file in step with the file (publish, or delete).

    Args:
        db: The database.
        path: The plugin file (it may have been deleted).
        collection: The functions collection.
        sign: Sign each publish (see :func:`host.publish.publish`).
    """
    name = plugin_name(path)
    if name is None:
        return
    started = time.perf_counter()
    if not await anyio.Path(path).is_file():
        try:
            await delete(db, name, collection=collection)
        except UnknownPlugin:
            return
        _log.info("dev.deleted", plugin=name, file=str(path))
        return
    try:
        published = await publish_file(db, path, name=name, collection=collection, sign=sign)
    except PublishError as exc:
        _log.error("dev.publish_failed", plugin=name, file=str(path), error=str(exc))
        return
    if published.changed:
        _log.info(
            "dev.published",
            plugin=name,
            revision=published.revision,
            file=str(path),
            publish_ms=round((time.perf_counter() - started) * 1000.0, 3),
        )


async def sync_folder(
    db: Any,
    directory: str | Path,
    stop: anyio.Event,
    *,
    collection: str = "functions",
    debounce_ms: int = 1_600,
    step_ms: int = 10,
    sign: Signer | None = None,
) -> None:
    """Publish plugin files of ``directory`` as they change, until ``stop`` is set.

    Args:
        db: The database.
        directory: The plugins folder (not recursive).
        stop: Set it to end the sync.
        collection: The functions collection.
        debounce_ms: Longest time changes are grouped before they are handled.
        step_ms: Quiet time that ends a group of changes (an editor's save is several
            file-system events: write temp file, rename...).
        sign: Sign each publish (see :func:`host.publish.publish`).
    """

    def only_plugins(change: watchfiles.Change, path: str) -> bool:
        return plugin_name(path) is not None

    _log.info("dev.watching", folder=str(directory))
    async for changes in watchfiles.awatch(
        directory,
        watch_filter=only_plugins,
        debounce=debounce_ms,
        step=step_ms,
        stop_event=stop,
        recursive=False,
    ):
        for path in sorted({path for _, path in changes}):
            try:
                await sync_path(db, path, collection=collection, sign=sign)
            except Exception as exc:  # MongoDB down for a moment: say so, keep watching
                _log.error("dev.sync_failed", file=path, error=f"{type(exc).__name__}: {exc}")
