"""Durability for ``--data-dir``: a write-ahead journal of oplog entries plus snapshots.

Every oplog entry is appended to ``journal.bson`` (one BSON document each) and the
buffer is written to the OS before the command's reply is sent, so every
acknowledged write survives ``kill -9`` (the OS keeps the page cache; pass
``fsync=True`` to also survive power loss). ``snapshot.bson`` holds the state as of
the last compaction: catalog, indexes, documents, the retained oplog window (so resume
tokens issued before a restart still resume after it) and the clock. Start-up loads
the snapshot, replays the journal (ignoring a torn last record, which was never
acknowledged), then compacts. A ``mongod.lock`` held with ``flock`` keeps two servers
off one directory.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import bson
from bson.errors import InvalidBSON

from .oplog import Entry
from .wire import CODEC_OPTIONS

JOURNAL = "journal.bson"
SNAPSHOT = "snapshot.bson"
LOCK = "mongod.lock"


class DataDirLocked(RuntimeError):
    """Another server holds the data directory."""


class Journal:
    """Append-only journal of oplog entries in a data directory.

    Args:
        path: The data directory (created if missing).
        fsync: Also fsync on every flush (survives power loss, slower).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._buffer: list[bytes] = []
        self._lock_file: IO[bytes] | None = None
        self._fd: int | None = None
        self.size = 0

    def lock(self) -> None:
        """Take the directory lock, or raise :class:`DataDirLocked`."""
        handle = open(self.dir / LOCK, "a+b")  # noqa: SIM115 - held for the server's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise DataDirLocked(f"data directory {self.dir} is in use by another server") from exc
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._lock_file = handle

    def read(self) -> tuple[list[dict[str, Any]], list[Entry]]:
        """Return the snapshot's records and the journal's entries, in order.

        A torn record at the end of the journal is dropped (it was never acknowledged).
        """
        snapshot = list(_iter_file(self.dir / SNAPSHOT, strict=True))
        entries = [Entry.from_document(doc) for doc in _iter_file(self.dir / JOURNAL, strict=False)]
        return snapshot, entries

    def write_snapshot(self, records: Iterator[dict[str, Any]]) -> None:
        """Atomically replace the snapshot with ``records`` and empty the journal."""
        self.flush()
        tmp = self.dir / (SNAPSHOT + ".tmp")
        with open(tmp, "wb") as out:
            for record in records:
                out.write(bson.encode(record, codec_options=CODEC_OPTIONS))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.dir / SNAPSHOT)
        self._close_fd()
        self._fd = os.open(self.dir / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, entry: Entry) -> None:
        """Buffer an entry; :meth:`flush` writes it."""
        self._buffer.append(bson.encode(entry.to_document(), codec_options=CODEC_OPTIONS))

    def flush(self) -> None:
        """Write buffered entries to the OS (and fsync if configured)."""
        if not self._buffer:
            return
        if self._fd is None:
            self._fd = os.open(self.dir / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        data = b"".join(self._buffer)
        self._buffer.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)
        if self.fsync:
            os.fsync(self._fd)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Flush, close the journal and release the lock."""
        self.flush()
        self._close_fd()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _iter_file(path: Path, *, strict: bool) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "little")
        if size < 5 or offset + size > len(data):
            break
        try:
            yield bson.decode(data[offset : offset + size], CODEC_OPTIONS)
        except InvalidBSON:
            if strict:
                raise
            break
        offset += size
    if offset != len(data) and strict:
        raise InvalidBSON(f"{path} is truncated at byte {offset}")
