"""Durability for ``--data-dir``: a write-ahead journal of oplog entries plus snapshots.

Every oplog entry is appended to ``journal.bson`` (one BSON document each) and written
to the OS before the command's reply is sent, so every acknowledged write survives
``kill -9`` (the OS keeps the page cache; pass ``fsync=True`` to also survive power
loss). ``snapshot.bson`` holds the state as of the last compaction: catalog, indexes,
documents, the retained oplog window (so resume tokens issued before a restart still
resume after it) and the clock. A ``mongod.lock`` held with ``flock`` keeps two servers
off one directory.

Design note: failures and torn tails.
    * A write to the journal that fails (ENOSPC, EIO...) raises :class:`JournalFailed`
      and the file is cut back to its last whole record (``ftruncate``), so nothing is
      ever appended after a torn record. The caller (``Storage``) rolls the write back
      and answers with MongoDB's error (14031 OutOfDiskSpace for a full disk). If even
      the cut fails, the journal is *broken*: every later write is refused until a
      restart, which recovers from what is on disk.
    * Recovery reads records up to the first one that does not decode whole. Anything
      after it is a torn tail (a write that was never acknowledged): it is reported
      (``embedded.journal_torn``, with the offset and the bytes dropped), cut off the
      file, and never replayed past.

Design note: compaction without a stall. Compaction writes a new snapshot; the journal
is kept in two segments so that it can run in a worker thread while the loop goes on
writing: :meth:`Journal.rotate` freezes ``journal.bson`` as ``journal.prev.bson`` and
starts a new one, the thread writes ``snapshot.bson`` from an immutable point-in-time
view (stored documents and oplog entries are never mutated in place), then the frozen
segment is removed. Recovery replays ``journal.prev.bson`` then ``journal.bson``,
skipping entries at or before the snapshot's clock, so a crash at any step loses
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import bson
import structlog
from bson.errors import InvalidBSON

from .oplog import Entry
from .wire import CODEC_OPTIONS

JOURNAL = "journal.bson"
PREVIOUS = "journal.prev.bson"
SNAPSHOT = "snapshot.bson"
LOCK = "mongod.lock"
# Appends always land at the end, even after a failed write was cut back (ftruncate).
_NEW_JOURNAL = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND

log = structlog.get_logger("host.embedded")


class DataDirError(RuntimeError):
    """The data directory cannot be used (the message names the directory and the cause)."""


class DataDirLocked(DataDirError):
    """Another server holds the data directory."""


class JournalFailed(Exception):
    """A journal write failed; nothing of it is on disk past the last whole record.

    Args:
        error: The OS error.
        broken: The file could not be cut back either: no further write is possible.
    """

    def __init__(self, error: OSError, *, broken: bool = False) -> None:
        super().__init__(f"journal write failed: {error.strerror or error}")
        self.errno = error.errno
        self.strerror = error.strerror or str(error)
        self.broken = broken

    @property
    def out_of_space(self) -> bool:
        """The disk (or quota) is full."""
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class Journal:
    """Append-only journal of oplog entries in a data directory.

    Args:
        path: The data directory (created if missing).
        fsync: Also fsync on every flush (survives power loss, slower).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.dir = Path(path)
        self.fsync = fsync
        self._buffer: list[bytes] = []
        self._lock_file: IO[bytes] | None = None
        self._fd: int | None = None
        self.size = 0
        self.broken: JournalFailed | None = None

    def lock(self) -> None:
        """Create the directory and take its lock, or raise :class:`DataDirLocked`."""
        self.dir.mkdir(parents=True, exist_ok=True)
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

        A torn tail of a journal segment is reported and cut off (see the module notes).

        Raises:
            DataDirError: If the snapshot is unreadable.
        """
        try:
            snapshot = list(_iter_file(self.dir / SNAPSHOT, strict=True))
        except InvalidBSON as exc:
            raise DataDirError(f"snapshot {self.dir / SNAPSHOT} is corrupt: {exc}") from exc
        entries: list[Entry] = []
        for name in (PREVIOUS, JOURNAL):
            entries.extend(Entry.from_document(doc) for doc in self._read_segment(self.dir / name))
        return snapshot, entries

    def _read_segment(self, path: Path) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        if not path.exists():
            return records
        valid = _Valid()
        records.extend(_iter_file(path, strict=False, valid=valid))
        size = path.stat().st_size
        if valid.offset < size:
            log.warning(
                "embedded.journal_torn",
                file=str(path),
                offset=valid.offset,
                dropped_bytes=size - valid.offset,
                records=len(records),
                detail="a record at the end of the journal was never completely written "
                "(never acknowledged); it is cut off and not replayed",
            )
            os.truncate(path, valid.offset)
        return records

    def write_snapshot(self, records: Iterable[dict[str, Any]]) -> None:
        """Atomically replace the snapshot with ``records`` (any thread).

        Call :meth:`rotate` first (on the loop); :meth:`drop_previous` after.
        """
        tmp = self.dir / (SNAPSHOT + ".tmp")
        try:
            with open(tmp, "wb") as out:
                for record in records:
                    out.write(bson.encode(record, codec_options=CODEC_OPTIONS))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.dir / SNAPSHOT)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.dir)

    def rotate(self) -> None:
        """Freeze the journal as the previous segment and start an empty one.

        Raises:
            JournalFailed: If buffered entries cannot be written.
            FileExistsError: If a previous segment is still waiting for its snapshot.
        """
        self.flush()
        if (self.dir / PREVIOUS).exists():
            raise FileExistsError(f"{self.dir / PREVIOUS} is still being compacted")
        self._close_fd()
        if (self.dir / JOURNAL).exists():
            os.replace(self.dir / JOURNAL, self.dir / PREVIOUS)
        self._fd = os.open(
            self.dir / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
        )
        self.size = 0
        _fsync_dir(self.dir)

    def truncate(self) -> None:
        """Empty the journal: a snapshot now covers everything in it."""
        self.flush()
        self._close_fd()
        self._fd = os.open(
            self.dir / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
        )
        self.size = 0
        _fsync_dir(self.dir)

    def drop_previous(self) -> None:
        """Remove the previous segment: a snapshot now covers it."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / PREVIOUS).unlink()
        _fsync_dir(self.dir)

    def append(self, record: dict[str, Any]) -> None:
        """Buffer a record (an entry's document); :meth:`flush` writes it."""
        self._buffer.append(bson.encode(record, codec_options=CODEC_OPTIONS))

    @property
    def pending(self) -> bool:
        """Records are buffered and not yet written."""
        return bool(self._buffer)

    def discard(self) -> None:
        """Forget buffered records (their writes were rolled back)."""
        self._buffer.clear()

    def flush(self) -> None:
        """Write buffered records to the OS (and fsync if configured).

        Raises:
            JournalFailed: The write failed; the file holds only whole records (or the
                journal is broken, see :attr:`broken`). The buffer is dropped: the
                caller rolls those writes back.
        """
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        if self.broken is not None:
            raise self.broken
        try:
            if self._fd is None:
                self._fd = os.open(
                    self.dir / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
                )
                self.size = os.fstat(self._fd).st_size
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._cut_back(exc)
        self.size += len(data)

    def _cut_back(self, exc: OSError) -> None:
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, self.size)
                os.lseek(self._fd, self.size, os.SEEK_SET)  # O_APPEND, but be explicit
        except OSError:
            self.broken = JournalFailed(exc, broken=True)
            log.error("embedded.journal_broken", data_dir=str(self.dir), error=str(exc))
            raise self.broken from exc
        log.error("embedded.journal_write_failed", data_dir=str(self.dir), error=str(exc))
        raise JournalFailed(exc) from exc

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Flush, close the journal and release the lock."""
        try:
            with contextlib.suppress(JournalFailed):
                self.flush()
        finally:
            self._close_fd()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Valid:
    """Where the last whole record of a file ends."""

    offset = 0


def _iter_file(
    path: Path, *, strict: bool, valid: _Valid | None = None
) -> Iterator[dict[str, Any]]:
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
            record = bson.decode(data[offset : offset + size], CODEC_OPTIONS)
        except InvalidBSON:
            if strict:
                raise
            break
        offset += size
        if valid is not None:
            valid.offset = offset
        yield record
    if offset != len(data) and strict:
        raise InvalidBSON(f"{path} is truncated at byte {offset}")
