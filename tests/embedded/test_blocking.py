"""No request blocks another: pings, change-stream getMores and writes interleave with a
100k-document count and a 100k-document insert.

Each test proves the interleaving by order, never by timing: the other requests
complete while the heavy one is still running (its thread has not returned), and the
heavy one then completes with the right answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo import MongoClient

from host.embedded import EmbeddedMongoThread
from host.embedded.server import EmbeddedMongo

from .support import wait_until

Doc = dict[str, Any]
N = 100_000
# Loading 100k documents through the driver takes a while on a busy 2-core machine.
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.embedded_only("head-of-line blocking in the embedded server"),
]


@pytest.fixture(scope="module")
def loaded() -> Iterator[EmbeddedMongoThread]:
    """A private server whose ``app.big`` holds 100,000 documents."""
    with EmbeddedMongoThread(port=0) as server:
        client: MongoClient[Doc] = MongoClient(server.uri)
        try:
            client.app.big.insert_many([{"_id": i, "v": i % 100} for i in range(N)])
        finally:
            client.close()
        yield server


class Background:
    """Run one blocking call in a thread; remember its result or error."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:  # reported by the test
            self.error = exc

    @property
    def running(self) -> bool:
        """The call has not returned yet."""
        return self.thread.is_alive()

    def join(self) -> Any:
        """Wait for the call and return its result (re-raising its error)."""
        self.thread.join(timeout=300)
        if self.error is not None:
            raise self.error
        return self.result


def _server(thread: EmbeddedMongoThread) -> EmbeddedMongo:
    assert thread.server is not None
    return thread.server


def test_ping_and_change_stream_answer_during_a_100k_count(loaded: EmbeddedMongoThread) -> None:
    """While count_documents scans 100k documents, a ping answers and a getMore delivers."""
    server = _server(loaded)
    heavy: MongoClient[Doc] = MongoClient(loaded.uri)
    other: MongoClient[Doc] = MongoClient(loaded.uri)
    try:
        with other.app.big.watch(max_await_time_ms=5000) as stream:
            aggregates = server.command_counts["aggregate"]
            count = Background(lambda: heavy.app.big.count_documents({"v": {"$gte": 0}}))
            wait_until(
                lambda: server.command_counts["aggregate"] > aggregates, "the count to start"
            )
            assert other.admin.command("ping")["ok"] == 1.0
            other.app.big.insert_one({"_id": "during", "v": 1})
            event = stream.next()
            assert event["documentKey"] == {"_id": "during"}
            assert count.running, "the ping and the event should not have waited for the count"
            # The count reads the snapshot taken when it started: 100k, not the new one.
            assert count.join() == N
        other.app.big.delete_one({"_id": "during"})
    finally:
        heavy.close()
        other.close()


def test_ping_and_reads_answer_during_a_100k_insert(loaded: EmbeddedMongoThread) -> None:
    """While one insert_many of 100k documents runs, pings and finds on other data answer."""
    server = _server(loaded)
    heavy: MongoClient[Doc] = MongoClient(loaded.uri)
    other: MongoClient[Doc] = MongoClient(loaded.uri)
    try:
        inserts = server.command_counts["insert"]
        docs = [{"_id": i, "w": i} for i in range(N)]
        insert = Background(lambda: heavy.app.bulk.insert_many(docs).inserted_ids)
        wait_until(lambda: server.command_counts["insert"] > inserts, "the insert to start")
        assert other.admin.command("ping")["ok"] == 1.0
        assert other.app.big.find_one({"_id": 7}) == {"_id": 7, "v": 7}
        assert insert.running, "the ping and the find should not have waited for the insert"
        assert len(insert.join()) == N
        assert other.app.bulk.estimated_document_count() == N
    finally:
        heavy.close()
        other.close()
