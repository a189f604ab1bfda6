"""The worker process's own life cycle on the real broker: its REST gateway listens on the
port it logs (a free one for ``--web-port 0``), SIGTERM or SIGINT stops it cleanly (exit
code 0, its queries' offsets committed, the serving group left, the port closed), and a
serving loop that stops on its own ends the process with a non-zero exit code and the
error logged.
Also: the producers' ``murmur2_random`` partitioner (librdkafka) puts a key where
``topics.partition_for`` says its selection state lives."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from clipstream.models.control import registry
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import collect

pytestmark = pytest.mark.integration

APP, MODEL = "digits-life", "digits-logreg"
LISTENING = re.compile(r"REST gateway on :(\d+) \(http, open: no authentication\)")


@pytest.fixture(scope="module")
def deployed(kafka_settings: Settings, digits_models) -> Settings:
    # no replica serves the model: the worker answers every query with the default at
    # its deadline, which is enough to see it serve
    registry.deploy_model(kafka_settings, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    registry.register_app(kafka_settings, APP, [MODEL], deadline_ms=300, default_label="5")
    return kafka_settings


def env_for(settings: Settings) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(settings.partitions),
        "CLIPSTREAM_GATEWAY_AUTH": "open",
    }


def logged_port(child: Child, timeout: float = 120) -> int:
    def found() -> int:
        match = LISTENING.search(child.log_path.read_text(errors="replace"))
        assert child.alive() or match, child.log_tail()
        return int(match.group(1)) if match else 0

    return int(wait_for(found, timeout, f"{child.name} to log its REST port"))


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def committed_queries(settings: Settings) -> int:
    consumer = Consumer(settings.kafka(**{"group.id": topics.SERVING_GROUP}))
    try:
        tps = [TopicPartition(topics.QUERIES, p) for p in range(settings.partitions)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10))
    finally:
        consumer.close()


def serving_members(settings: Settings) -> int:
    admin = AdminClient(settings.kafka())
    group = admin.describe_consumer_groups([topics.SERVING_GROUP])[topics.SERVING_GROUP]
    return len(group.result(10).members)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_worker_cleanly(
    deployed: Settings, tmp_path: Path, signum: signal.Signals
) -> None:
    before = committed_queries(deployed)
    worker = spawn(
        "worker", clipstream_command("worker", "--web-port", "0"), tmp_path, env_for(deployed)
    )
    try:
        port = logged_port(worker)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert json.loads(response.read()) == {"status": "OK"}
        # over Kafka, then over REST on the port the worker logged
        client, reader = Client(deployed), PredictionReader(deployed)
        qids = {client.send_query(APP, [0.0] * 64, deadline_ms=1000) for _ in range(5)}
        client.flush()
        got = collect(reader, qids, timeout=90)
        reader.close()
        assert set(got) == qids, worker.log_tail()
        status, body = post(f"http://127.0.0.1:{port}/apps/{APP}/predict", {"features": [0.0] * 64})
        assert status == 200 and body["label"] == "5", body
        assert serving_members(deployed) == 1
        worker.signal(signum)
        worker.proc.wait(30)
    finally:
        code = worker.stop(timeout=30)
    log = worker.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert committed_queries(deployed) - before == 6  # the five over Kafka and the REST one
    assert serving_members(deployed) == 0  # it left the group: no session timeout to wait
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the port is closed


FAILING_WORKER = """
import sys
from clipstream.streams.worker import serving

def broken_loop(self):
    raise RuntimeError("the serving loop broke on purpose")

serving.ServingLoop._loop = broken_loop
from clipstream.streams.ops.cli import main
main(["worker", "--web-port", "0"])
"""


def test_a_serving_loop_that_fails_ends_the_process_non_zero(
    deployed: Settings, tmp_path: Path
) -> None:
    worker = spawn(
        "failing-worker", [sys.executable, "-c", FAILING_WORKER], tmp_path, env_for(deployed)
    )
    try:
        code = worker.proc.wait(120)
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert code == 1, log[-3000:]
    assert "serving loop failed" in log and "Traceback" in log, log[-3000:]
    assert "stopped on its own: RuntimeError('the serving loop broke on purpose')" in log
    assert "error: unexpected RuntimeError: the serving loop broke on purpose" in log
    assert LISTENING.search(log), log[-3000:]  # the gateway was up, and was closed


def test_librdkafkas_murmur2_random_partitioner_agrees_with_partition_for(
    kafka_settings: Settings,
) -> None:
    name, partitions = "partitioner-check", 7
    admin = AdminClient(kafka_settings.kafka())
    topics.ensure_topics(admin, [NewTopic(name, partitions, 1)])
    producer = Producer(kafka_settings.kafka(**{"partitioner": "murmur2_random"}))
    placed: dict[str, int] = {}
    keys = ["a", "é|ü", "app|user-17", *(f"digits|u{i}" for i in range(300))]
    keys += [f"{'k' * (i % 41)}|{i}" for i in range(300)]

    def delivered(err, msg) -> None:
        assert err is None, err
        placed[msg.key().decode()] = msg.partition()

    for key in keys:
        producer.produce(name, b"x", key.encode(), on_delivery=delivered)
    assert producer.flush(30) == 0
    assert placed == {key: topics.partition_for(key, partitions) for key in keys}
