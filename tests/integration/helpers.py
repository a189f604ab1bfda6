"""Helpers for integration tests: serve an app and collect its predictions."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from clipstream.streams.runtime.processes import clipstream_command
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import consume_ready
from tests.conftest import wait_for


def collect(
    reader: PredictionReader, wanted: set[str], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Predictions for ``wanted`` query ids until all arrived or ``timeout``; a list per id so
    a test can see duplicates (the reader's own de-duplication is bypassed)."""
    got: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not wanted.issubset(got):
        for msg in consume_ready(reader.consumer, 500, 0.2):
            if msg.error():
                continue
            record = codec.decode("Prediction", msg.value())
            if record["query_id"] in wanted:
                got.setdefault(record["query_id"], []).append(record)
    return got


def wait_until_serving(
    client: Client,
    reader: PredictionReader,
    app: str,
    features: list[float],
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Send one query with a long deadline; return its prediction once the path is up."""
    qid = client.send_query(app, features, deadline_ms=int(timeout * 1000))
    client.flush()
    got = collect(reader, {qid}, timeout)
    assert qid in got, f"no prediction within {timeout}s: worker or replicas not serving"
    return got[qid][0]


def read_to_end(settings: Settings, topic: str, timeout: float = 10.0) -> list[Message]:
    """Every message currently on ``topic`` (all partitions, from the beginning)."""
    consumer = Consumer(
        settings.kafka(**{"group.id": f"test-read-{time.time_ns()}", "enable.auto.commit": False})
    )
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics[topic]
        ends = {}
        parts = []
        for p in md.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
                parts.append(TopicPartition(topic, p, low))
        consumer.assign(parts)
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error():
                    continue
                out.append(msg)
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
        return out
    finally:
        consumer.close()


def read_all(settings: Settings, topic: str, kind: str, timeout: float = 10.0) -> list[dict]:
    """Every record currently on ``topic``, decoded as ``kind``."""
    return [codec.decode(kind, msg.value()) for msg in read_to_end(settings, topic, timeout)]


def run_cli(
    settings: Settings, *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """One `clipstream` command against the test broker, as a user runs it."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(settings.partitions),
        "COLUMNS": "200",  # rich tables unabridged
    }
    return subprocess.run(
        clipstream_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )


def group_caught_up(settings: Settings, topic: str, group: str = topics.SERVING_GROUP) -> bool:
    """True once ``group`` has committed every offset of ``topic``."""
    consumer = Consumer(settings.kafka(**{"group.id": group, "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        for c in consumer.committed(tps, timeout=10):
            high = consumer.get_watermark_offsets(TopicPartition(topic, c.partition), timeout=10)[1]
            if high > 0 and c.offset < high:
                return False
        return True
    except Exception:  # the broker may be restarting: not caught up yet
        return False
    finally:
        consumer.close()


def learnt_everything(settings: Settings) -> bool:
    """Every feedback record joined to its answers by the serving group, and every
    observation folded into its key's state (the serving group as well)."""
    return group_caught_up(settings, topics.FEEDBACK) and group_caught_up(
        settings, topics.OBSERVATIONS
    )


def stored_states(settings: Settings, app: str) -> tuple[dict[str, dict], dict[str, set[int]]]:
    """Selection key -> its last state on the table's changelog (what a restarted worker
    recovers), and the changelog partitions each key was ever written to."""
    latest: dict[str, dict] = {}
    written: dict[str, set[int]] = {}
    for msg in read_to_end(settings, topics.SELECTION_CHANGELOG, timeout=30):
        key = msg.key().decode()  # the table's keys are the selection keys' bytes
        if key.split("|")[0] == app and msg.value() is not None:
            latest[key] = json.loads(msg.value())
            written.setdefault(key, set()).add(msg.partition())
    return latest, written


def workers_serving(settings: Settings, n: int, timeout: float = 60) -> None:
    """``n`` workers hold partitions of the serving group (not mid-rebalance)."""
    admin = AdminClient(settings.kafka())  # kept: its futures die with it

    def stable() -> bool:
        (future,) = admin.describe_consumer_groups([topics.SERVING_GROUP]).values()
        group = future.result(10)
        members = [m for m in group.members if m.assignment.topic_partitions]
        return str(group.state).endswith("STABLE") and len(members) == n

    wait_for(stable, timeout, f"{n} workers sharing the serving group", interval=0.2)


def stop_children(children: list) -> None:
    """Stop processes a module started; print the logs of all if one ended badly (not by
    the test's own SIGTERM or SIGKILL), so the failure shows why."""
    for child in children:
        child.stop()
    if any(c.proc.returncode not in (0, -9, -15) for c in children):
        for c in children:
            print(f"--- {c.name} (exit {c.proc.returncode}) ---\n{c.log_tail(60)}")
