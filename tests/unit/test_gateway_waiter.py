"""The gateway's wait for predictions (streams/gateway/server.py), with a fake predictions
reader and a fake client: a second request for a query id still waiting is a 409 (the
first keeps its waiter), and the wait for an idle reader to resume counts against the
request's deadline. Over a live worker: tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from clipstream.streams.gateway import server
from clipstream.streams.wire.config import Settings

APP = {"deadline_ms": 300, "default_label": "0", "input_dim": None}


class FakeReader:
    """The PredictionReader's surface the waiter uses; ``resume_s`` slows its resume."""

    resume_s = 0.0

    def __init__(self, settings: Settings, sensor: Any = None) -> None:
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()

    def poll(self, timeout: float, keys: Any = None) -> list[dict[str, Any]]:
        try:
            record = self.records.get(timeout=timeout)
        except queue.Empty:
            return []
        return [record] if keys is None or record["query_id"].encode() in keys else []

    def pause(self) -> None:
        pass

    def resume_at_end(self) -> None:
        time.sleep(self.resume_s)

    def close(self) -> None:
        pass


class FakeClient:
    """Sends nothing; answers each query with a prediction after ``answer_s``."""

    def __init__(self, reader: FakeReader, answer_s: float = 0.2) -> None:
        self.reader, self.answer_s = reader, answer_s
        self.sent: list[str] = []

    def send_query(self, app: str, query_id: str, **query: Any) -> None:
        self.sent.append(query_id)
        record = {"query_id": query_id, "app": app, "user": query["user"], "label": "5"}
        threading.Timer(self.answer_s, self.reader.records.put, (record,)).start()


class FakeRegistry:
    def app(self, name: str) -> dict[str, Any] | None:
        return APP if name == "app" else None


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[server.Gateway]:
    monkeypatch.setattr(server, "PredictionReader", FakeReader)
    settings = Settings(bootstrap="unused:9", gateway_margin_ms=200.0)
    gw = server.Gateway.__new__(server.Gateway)  # no Kafka client, no auth set-up
    gw.settings, gw.registry = settings, FakeRegistry()
    gw.waiter = server.PredictionWaiter(settings)
    gw.client = FakeClient(gw.waiter.reader)  # type: ignore[assignment]
    try:
        yield gw
    finally:
        gw.waiter.close()


def test_a_second_request_with_a_waiting_query_id_is_a_409(gateway) -> None:
    async def both() -> list[tuple[int, dict[str, Any]]]:
        body = {"features": [1.0], "query_id": "same", "user": "u"}
        return await asyncio.gather(gateway.predict("app", body), gateway.predict("app", body))

    (status, first), (conflict, second) = asyncio.run(both())
    # the first keeps its waiter (it was replaced, and got the default, before)
    assert status == 200 and (first["query_id"], first["label"]) == ("same", "5")
    assert "default" not in first
    assert conflict == 409
    assert second == {
        "error": "'query_id' 'same' is already waiting for its prediction: use a fresh id per query"
    }
    assert gateway.client.sent == ["same"]
    assert gateway.waiter._waiting == {}
    # once answered, the id is free on the gateway again (the worker's dedup is its own)
    assert asyncio.run(gateway.predict("app", {"features": [1.0], "query_id": "same"}))[0] == 200


def test_a_request_gone_frees_its_query_id(gateway) -> None:
    gateway.client.answer_s = 1.0  # not before the cancel

    async def cancelled_then_again() -> tuple[int, dict[str, Any]]:
        body = {"features": [1.0], "query_id": "q"}
        first = asyncio.ensure_future(gateway.predict("app", body))
        await asyncio.sleep(0.1)
        first.cancel()  # its client went away
        await asyncio.gather(first, return_exceptions=True)
        assert gateway.waiter._waiting == {}
        gateway.client.answer_s = 0.1
        return await gateway.predict("app", body)

    status, body = asyncio.run(cancelled_then_again())
    assert (status, body["label"]) == (200, "5") and "default" not in body


def test_the_readers_resume_counts_against_the_deadline(gateway) -> None:
    gateway.waiter.IDLE_S = 0.05
    deadline = time.monotonic() + 5
    while gateway.waiter._active.is_set():  # the idle reader pauses
        assert time.monotonic() < deadline
        time.sleep(0.01)
    FakeReader.resume_s = 3.0  # far beyond the app's 300 ms + the 200 ms margin
    try:
        started = time.monotonic()
        status, body = asyncio.run(gateway.predict("app", {"features": [1.0]}))
        took = time.monotonic() - started
    finally:
        FakeReader.resume_s = 0.0
    assert status == 200 and body["default"] is True and body["label"] == "0"
    assert took < 1.0, took  # not 3 s (nor the former fixed 30 s) on top of the deadline
    assert gateway.client.sent == []  # never sent: its prediction could not be read
    assert gateway.waiter._waiting == {}
