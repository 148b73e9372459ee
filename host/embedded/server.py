"""The embedded MongoDB-compatible server: connections, command execution, lifecycle.

One asyncio server on loopback. Each connection is a task that reads a message,
executes it and writes the reply, in order, as MongoDB does for a connection.
Writes run whole on the event loop, so their oplog order is their apply order; a
write is journaled (``Storage.commit``) before its reply and before its retryable-write
outcome is remembered, so no acknowledgment, first or replayed, covers a write that is
not on disk. getMore on a change stream and awaitable hello wait on events, never on
timers.

Design note: no request blocks another. Heavy reads (find, count, aggregate over more
than a few thousand documents) run in a worker thread over a point-in-time snapshot
of immutable documents (see ``storage.py``); a big insert yields to the loop between
chunks of statements (``Commands.insert``); compaction writes its snapshot in a thread
(see ``journal.py``). So pings, change-stream getMores and other clients' reads and
writes interleave with a long command instead of waiting for it. A message that does
not parse closes that one connection; the server and its other connections carry on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from bson import ObjectId
from bson.binary import Binary, UuidRepresentation
from bson.int64 import Int64

from .commands import WRITE_COMMANDS, Commands, Session, cluster_time_fields
from .errors import (
    RESUMABLE_CHANGE_STREAM_CODES,
    RETRYABLE_WRITE_CODES,
    CloseConnection,
    CommandError,
)
from .failpoints import FailPoints
from .journal import DataDirError, Journal, JournalFailed
from .oplog import Entry, Oplog
from .storage import CollectionInfo, Storage
from .ttl import DEFAULT_PERIOD, TTLMonitor
from .wire import ProtocolError, Request, encode_reply, read_request

log = structlog.get_logger("host.embedded")

DEFAULT_OPLOG_MB = 64.0
COMPACT_JOURNAL_BYTES = 64 * 1024 * 1024
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
HANDSHAKE_COMMANDS = frozenset({"hello", "isMaster", "ismaster"})
# mongod's NotPrimaryError category: these replies carry topologyVersion. Its
# ShutdownError codes (91, 11600) carry it only while the server is shutting down
# (quiesce mode); elsewhere a driver would judge them stale and not clear its pool.
NOT_PRIMARY_CODES = frozenset({189, 10058, 10107, 11602, 13435, 13436})
SHUTDOWN_CODES = frozenset({91, 11600})


class EmbeddedMongo:
    """A single-node replica set speaking the MongoDB wire protocol.

    Use as an async context manager::

        async with EmbeddedMongo(port=0) as server:
            client = AsyncMongoClient(server.uri)

    Args:
        port: TCP port; 0 picks a free one.
        data_dir: Directory for durability; None keeps everything in memory.
        host: Address to bind. Loopback by default: the server has no authentication.
        oplog_size: Megabytes of oplog to retain for change streams (mongod's
            ``--oplogSize``): entries count their BSON size.
        oplog_max_entries: Also retain at most this many entries (tests use it).
        advertised_host: The host name clients dial, as reported in ``hello``
            (default: ``host``, or 127.0.0.1 for a wildcard bind).
        replica_set: The replica set name.
        fsync: fsync the journal on every write (survive power loss, not only kill -9).
        ttl_monitor_period: Seconds between TTL index sweeps (mongod's
            ``ttlMonitorSleepSecs``, 60); None: no TTL monitor.
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        oplog_size: float = DEFAULT_OPLOG_MB,
        oplog_max_entries: int | None = None,
        advertised_host: str | None = None,
        replica_set: str = "rs0",
        fsync: bool = False,
        ttl_monitor_period: float | None = DEFAULT_PERIOD,
    ) -> None:
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.replica_set = replica_set
        self._advertised_host = advertised_host
        if oplog_size <= 0:
            raise ValueError(f"oplog_size must be a positive number of MB, got {oplog_size}")
        self.oplog = Oplog(max(1, int(oplog_size * 1024 * 1024)), oplog_max_entries)
        self.journal = Journal(self.data_dir, fsync=fsync) if self.data_dir is not None else None
        self.storage = Storage(self.oplog, self.journal)
        self.failpoints = FailPoints()
        self.commands = Commands(self)
        self.ttl_monitor = (
            TTLMonitor(self.storage, ttl_monitor_period, after_sweep=self._flush_journal)
            if ttl_monitor_period is not None
            else None
        )
        self.process_id = ObjectId()
        self.topology_counter = 0
        self.closing = False
        self.started_at = time.monotonic()
        self.connections_created = 0
        self._connection_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._topology_changed = asyncio.Event()
        self._compaction: asyncio.Future[None] | None = None
        # Compact (in the background) once the journal passes this many bytes.
        self.compact_journal_bytes = COMPACT_JOURNAL_BYTES
        # Commands received, by name: cheap introspection for tests and benchmarks.
        self.command_counts: collections.Counter[str] = collections.Counter()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def advertised(self) -> str:
        """``host:port`` as clients must dial it (the replica-set member address)."""
        host = self._advertised_host or (
            "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        )
        if ":" in host:
            host = f"[{host}]"
        return f"{host.lower()}:{self.port}"

    @property
    def uri(self) -> str:
        """The connection string: ``mongodb://127.0.0.1:PORT/?replicaSet=rs0``."""
        return f"mongodb://{self.advertised}/?replicaSet={self.replica_set}"

    @property
    def connection_count(self) -> int:
        """Open client connections."""
        return len(self._writers)

    async def start(self) -> None:
        """Load the data directory (if any) and start listening.

        Raises:
            DataDirError: The data directory cannot be used; the message names it and the
                real cause (locked, full disk, unreadable snapshot...).
            OSError: The address cannot be bound.
        """
        if self.journal is not None:
            try:
                self._recover()
            except DataDirError:
                self.journal.close()
                raise
            except (OSError, JournalFailed) as exc:
                self.journal.close()
                cause = getattr(exc, "strerror", None) or str(exc)
                raise DataDirError(
                    f"cannot recover the data directory {self.data_dir}: {cause}"
                ) from exc
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True, limit=2**20
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self.started_at = time.monotonic()
        if self.ttl_monitor is not None:  # cancelled by aclose() with the other tasks
            task = asyncio.create_task(self.ttl_monitor.run(), name="embedded TTL monitor")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.info(
            "embedded.started",
            uri=self.uri,
            data_dir=str(self.data_dir) if self.data_dir else None,
            bind=self.host,
        )
        if self.host not in LOOPBACK:
            log.warning(
                "embedded.unauthenticated_bind",
                bind=self.host,
                warning="the embedded server has no authentication: anyone who can reach "
                f"{self.host}:{self.port} can read and write every database",
            )

    async def aclose(self) -> None:
        """Stop accepting, close connections, release waiters and flush the journal."""
        if self.closing:
            return
        self.closing = True
        self._topology_changed.set()
        self.oplog.wake_all()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self.commands.cursors.close_all()
        if self._compaction is not None:
            with contextlib.suppress(Exception):
                await self._compaction
        self.storage.close()
        if self.journal is not None:
            self.journal.close()
        log.info("embedded.stopped", uri=self.uri)

    async def __aenter__(self) -> EmbeddedMongo:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        assert self._server is not None, "call start() first"
        await self._server.serve_forever()

    async def wait_topology_change(self, max_wait: float) -> None:
        """Wait for a topology change (only shutdown, here) or ``max_wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._topology_changed.wait(), max_wait)

    # -- durability ------------------------------------------------------------------

    def _flush_journal(self) -> None:
        if self.journal is not None:
            self.journal.flush()

    def _recover(self) -> None:
        assert self.journal is not None
        self.journal.lock()
        snapshot, entries = self.journal.read()
        snapshot_clock = None
        pending: dict[
            tuple[str, str], tuple[CollectionInfo, list[dict[str, Any]], list[dict[str, Any]]]
        ] = {}
        for record in snapshot:
            kind = record.get("t")
            if kind == "meta":
                snapshot_clock = record["clock"]
                self.oplog.advance_to(snapshot_clock)
            elif kind == "coll":
                info = CollectionInfo(
                    record["uuid"].as_uuid(UuidRepresentation.STANDARD),
                    dict(record.get("options", {})),
                )
                pending[(record["db"], record["coll"])] = (
                    info,
                    list(record.get("indexes", [])),
                    [],
                )
            elif kind == "doc":
                pending[(record["db"], record["coll"])][2].append(record["doc"])
            elif kind == "entry":
                self.oplog.append(Entry.from_document(record["e"]))
        for (db, coll), (info, indexes, docs) in pending.items():
            self.storage.load(db, coll, info, indexes, docs)
        for record in snapshot:
            if record.get("t") == "meta" and record.get("trimmed") is not None:
                self.oplog.trimmed_through = record["trimmed"]
        replayed = 0
        for entry in entries:
            if snapshot_clock is not None and (entry.ts.time, entry.ts.inc) <= (
                snapshot_clock.time,
                snapshot_clock.inc,
            ):
                continue  # already in the snapshot (crash between snapshot and truncation)
            self.storage.replay(entry)
            self.oplog.append(entry.lean())
            replayed += 1
        # Nothing else runs yet: compact in place, then both journal segments are covered.
        self.journal.write_snapshot(self._snapshot_records(self._snapshot_view()))
        self.journal.truncate()
        self.journal.drop_previous()
        log.info(
            "embedded.recovered",
            data_dir=str(self.data_dir),
            collections=len(self.storage.catalog),
            oplog_entries=len(self.oplog),
            journal_entries_replayed=replayed,
        )

    def _snapshot_view(self) -> tuple[dict[str, Any], list[Any], list[Entry]]:
        """What a snapshot holds, as references taken on the loop (all immutable)."""
        meta = {
            "t": "meta",
            "version": 1,
            "clock": self.oplog.last_ts,
            "trimmed": self.oplog.trimmed_through,
        }
        return meta, self.storage.dump(), self.oplog.entries()

    @staticmethod
    def _snapshot_records(
        view: tuple[dict[str, Any], list[Any], list[Entry]],
    ) -> Iterator[dict[str, Any]]:
        meta, collections, entries = view
        yield meta
        for db, coll, info, indexes, docs in collections:
            yield {
                "t": "coll",
                "db": db,
                "coll": coll,
                "uuid": Binary.from_uuid(info.uuid),
                "options": info.options,
                "indexes": indexes,
            }
            for doc in docs:
                yield {"t": "doc", "db": db, "coll": coll, "doc": doc}
        for entry in entries:
            yield {"t": "entry", "e": entry.to_document()}

    def _maybe_compact(self) -> None:
        """Start a background compaction once the journal is big (see ``journal.py``)."""
        journal = self.journal
        if journal is None or self._compaction is not None or self.closing:
            return
        if journal.size <= self.compact_journal_bytes:
            return
        try:
            journal.rotate()
        except FileExistsError:
            pass  # an earlier compaction failed: its segment is still there, retry it
        except (OSError, JournalFailed) as exc:
            log.error("embedded.compaction_failed", data_dir=str(self.data_dir), error=str(exc))
            return
        records = self._snapshot_records(self._snapshot_view())
        started = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(None, journal.write_snapshot, records)
        self._compaction = future

        def done(fut: asyncio.Future[None]) -> None:
            self._compaction = None
            exc = fut.exception() if not fut.cancelled() else None
            if exc is not None:
                log.error("embedded.compaction_failed", data_dir=str(self.data_dir), error=str(exc))
                return
            try:
                journal.drop_previous()
            except OSError as err:
                log.error("embedded.compaction_failed", data_dir=str(self.data_dir), error=str(err))
                return
            log.info(
                "embedded.compacted",
                data_dir=str(self.data_dir),
                seconds=round(time.monotonic() - started, 3),
                oplog_entries=len(self.oplog),
                oplog_bytes=self.oplog.bytes,
            )

        future.add_done_callback(done)

    # -- connections -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections_created += 1
        peer = writer.get_extra_info("peername")
        peer_str = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        session = Session(connection_id=next(self._connection_ids), peer=peer_str)
        try:
            while not self.closing:
                try:
                    request = await read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                except ProtocolError as exc:
                    log.warning("embedded.bad_message", peer=peer_str, error=str(exc))
                    break
                try:
                    reply = await self._execute(session, request)
                except CloseConnection:
                    break
                if request.more_to_come:
                    continue
                reply_id = next(self._request_ids)
                exhaust = _is_exhaust_hello(request, reply)
                writer.write(encode_reply(request, reply, reply_id, more_to_come=exhaust))
                await writer.drain()
                if exhaust:
                    try:
                        await self._stream_hello(session, request, reply, reply_id, reader, writer)
                    except CloseConnection:
                        break
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # never let one connection take the server down
            if writer.is_closing():
                # The peer went away mid-reply. asyncio raises ConnectionError for that,
                # uvloop (the dev daemon's loop) RuntimeError("... the handler is closed").
                log.debug("embedded.connection_lost", peer=peer_str)
            else:
                log.exception("embedded.connection_failed", peer=peer_str)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _execute(self, session: Session, request: Request) -> dict[str, Any]:
        body = request.body
        db = request.db
        name = next(iter(body), None)
        if name is not None:
            self.command_counts[name] += 1
        has_txn = "txnNumber" in body
        change_stream = name == "aggregate" and _is_change_stream(body.get("pipeline"))
        try:
            if name is None:
                raise CommandError(59, "no command found in an empty document")
            target = body[name]
            ns = f"{db}.{target}" if isinstance(target, str) else db
            if name in HANDSHAKE_COMMANDS and session.app_name is None:
                # Client metadata is known before failpoints run, so an appName
                # filter can fail a connection's very first handshake (SDAM tests).
                session.app_name = _app_name(body)
            action = self.failpoints.check("failCommand", name, session.app_name, ns)
            if action is not None:
                if action.block_ms:
                    await asyncio.sleep(action.block_ms / 1000)
                if action.close_connection:
                    raise CloseConnection()
                if action.error is not None:
                    raise action.error
            reply = await self.commands.run(session, db, body)
            # Journaled before it is acknowledged: a reply never covers a write that is
            # not on disk (and the retryable-write history keeps only what is; see
            # host/embedded/retryable.py).
            self.storage.commit()
            if action is not None and action.write_concern_error is not None:
                reply["writeConcernError"] = action.write_concern_error
                if action.labels is not None:
                    reply["errorLabels"] = list(action.labels)
            wce = reply.get("writeConcernError")
            if (
                has_txn
                and name in WRITE_COMMANDS
                and isinstance(wce, Mapping)
                and wce.get("code") in RETRYABLE_WRITE_CODES
                and "errorLabels" not in reply
            ):
                # mongod labels a retryable write whose write concern failed retryably.
                reply["errorLabels"] = ["RetryableWriteError"]
        except CloseConnection:
            raise
        except CommandError as err:
            err = self._commit_after(err)
            reply = err.to_reply()
            if not err.labels_explicit:
                labels = list(err.labels or [])
                if has_txn and name in WRITE_COMMANDS and err.code in RETRYABLE_WRITE_CODES:
                    labels.append("RetryableWriteError")
                if (
                    change_stream or err.change_stream
                ) and err.code in RESUMABLE_CHANGE_STREAM_CODES:
                    labels.append("ResumableChangeStreamError")
                if labels:
                    reply["errorLabels"] = labels
            if err.code in NOT_PRIMARY_CODES or (err.code in SHUTDOWN_CODES and self.closing):
                # As mongod: a NotPrimary/Shutdown error carries the topologyVersion, so
                # drivers can tell it is not newer than what they know and ignore it
                # instead of marking the server Unknown (SDAM "stale errors").
                reply["topologyVersion"] = {
                    "processId": self.process_id,
                    "counter": Int64(self.topology_counter),
                }
        except Exception as exc:
            log.exception("embedded.command_failed", command=name, db=db)
            reply = self._commit_after(
                CommandError(
                    1,
                    f"internal error in the embedded server running {name}: "
                    f"{type(exc).__name__}: {exc}",
                )
            ).to_reply()
        finally:
            self._maybe_compact()
        reply.update(cluster_time_fields(self.oplog.last_ts))
        return reply

    # Design note: streaming (exhaust) hello. The Node driver's monitor sends its awaitable
    # hello with exhaustAllowed and treats a reply without moreToCome as a protocol error
    # ("Server ended moreToCome unexpectedly"), marking the server Unknown and clearing its
    # pool. MongoDB keeps answering on that connection instead: each reply waits up to
    # maxAwaitTimeMS for a topology change, carries moreToCome, and its responseTo is the
    # previous reply's requestID. See the SDAM monitoring spec, "Streaming protocol"
    # (source/server-discovery-and-monitoring/server-monitoring.md) and OP_MSG's
    # exhaustAllowed. A reply without moreToCome (an error, shutdown) ends the stream.
    async def _stream_hello(
        self,
        session: Session,
        request: Request,
        reply: dict[str, Any],
        reply_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        more = True
        while more and not self.closing and not reader.at_eof() and not writer.is_closing():
            request.body["topologyVersion"] = reply["topologyVersion"]
            request = dataclasses.replace(request, request_id=reply_id)
            reply = await self._execute(session, request)
            more = _is_exhaust_hello(request, reply) and not self.closing
            reply_id = next(self._request_ids)
            writer.write(encode_reply(request, reply, reply_id, more_to_come=more))
            await writer.drain()

    def _commit_after(self, err: CommandError) -> CommandError:
        """Journal what a failed command wrote before failing; a journal error wins."""
        try:
            self.storage.commit()
        except CommandError as journal_err:
            return journal_err
        return err


def _is_exhaust_hello(request: Request, reply: Mapping[str, Any]) -> bool:
    """True when ``reply`` answers an awaitable hello the client allows to stream (exhaust)."""
    body = request.body
    return (
        request.exhaust_allowed
        and next(iter(body), None) in ("hello", "isMaster", "ismaster")
        and "topologyVersion" in body
        and "maxAwaitTimeMS" in body
        and reply.get("ok") == 1
        and "topologyVersion" in reply
    )


def _app_name(body: Mapping[str, Any]) -> str | None:
    client = body.get("client")
    app = client.get("application") if isinstance(client, Mapping) else None
    name = app.get("name") if isinstance(app, Mapping) else None
    return name if isinstance(name, str) else None


def _is_change_stream(pipeline: Any) -> bool:
    return (
        isinstance(pipeline, list)
        and bool(pipeline)
        and isinstance(pipeline[0], Mapping)
        and "$changeStream" in pipeline[0]
    )


class EmbeddedMongoThread:
    """Run an :class:`EmbeddedMongo` on its own event loop in a background thread.

    For synchronous code and for other event loops::

        with EmbeddedMongoThread(port=0) as server:
            client = MongoClient(server.uri)

    Args:
        **kwargs: Passed to :class:`EmbeddedMongo`.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: EmbeddedMongo | None = None

    @property
    def uri(self) -> str:
        """The running server's connection string."""
        assert self.server is not None, "server is not running"
        return self.server.uri

    def start(self) -> str:
        """Start the server thread and return the URI once it accepts connections."""
        self._thread = threading.Thread(target=self._run, name="embedded-mongo", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.uri

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with EmbeddedMongo(**self._kwargs) as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        """Stop the server and join the thread."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
        self._thread = None

    def __enter__(self) -> EmbeddedMongoThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
