"""The embedded dev broker against a real Kafka: produce/consume, port clashes, clean stops,
and the detached broker the CLI uses. Every test stops what it started, also on failure."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from clipstream.streams.broker import (
    BrokerError,
    EmbeddedBroker,
    resolve_jars,
    start_detached,
    status_detached,
    stop_detached,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def pid_gone(pid: int) -> bool:
    """No such process, or only a zombie left for someone else to reap."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_if_alive(pid: int | None) -> None:
    if pid is not None and not pid_gone(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker()
    try:
        b.start()
        yield b
    finally:
        b.stop()


def test_jars_are_cached() -> None:
    first = resolve_jars()
    started = time.monotonic()
    again = resolve_jars()
    assert again == first
    assert time.monotonic() - started < 1.0  # the marker short-cuts mvn
    names = {p.name for p in first}
    assert any(n.startswith("kafka_2.13-4.") for n in names)
    assert any(n.startswith("kafka-server-4.") for n in names)  # runtime scope, not compile
    assert any(n.startswith("log4j-slf4j2-impl-") for n in names)


def test_produce_and_consume_on_three_partitions(broker: EmbeddedBroker) -> None:
    topic = f"test-broker-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    metadata = admin.list_topics(topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == 3

    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        delivered.append((msg.partition(), msg.offset()))  # type: ignore[attr-defined]

    producer.produce(topic, value=b"hello kafka", key=b"k1", partition=2, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert delivered == [(2, 0)]

    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"g-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        msg = None
        deadline = time.monotonic() + 60
        while msg is None and time.monotonic() < deadline:
            polled = consumer.poll(0.5)
            if polled is not None:
                assert polled.error() is None, polled.error()
                msg = polled
        assert msg is not None, "no message consumed within 60s"
        assert (msg.key(), msg.value(), msg.partition(), msg.offset()) == (
            b"k1",
            b"hello kafka",
            2,
            0,
        )
        consumer.commit(msg, asynchronous=False)
    finally:
        consumer.close()


def test_auto_create_is_off(broker: EmbeddedBroker) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    config = admin.list_topics(timeout=10)  # any answer proves the admin path
    assert config.brokers
    missing = f"never-created-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": broker.bootstrap, "message.timeout.ms": 3000})
    errors: list[object] = []
    producer.produce(missing, b"x", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(10)
    assert errors and errors[0] is not None
    assert missing not in admin.list_topics(timeout=10).topics


def test_taken_port_is_refused(broker: EmbeddedBroker) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match=rf"port {port} on 127\.0\.0\.1 is already in use"):
            EmbeddedBroker(port=port).start()
    # a port held by a running broker counts as taken too
    clash = EmbeddedBroker(port=broker.port)
    try:
        with pytest.raises(BrokerError, match="already in use"):
            clash.start()
        assert clash.pid is None
    finally:
        clash.stop()


def test_bad_config_fails_with_the_reason(tmp_path: Path) -> None:
    # Kafka wants strictly more than 1 MiB of dedupe buffer per cleaner thread
    bad = EmbeddedBroker(
        data_dir=tmp_path / "kafka", extra_config={"log.cleaner.dedupe.buffer.size": "1048576"}
    )
    try:
        with pytest.raises(BrokerError, match="1MB per cleaner thread"):
            bad.start(timeout=60)
        assert bad.pid is None
    finally:
        bad.stop()


def test_stop_leaves_no_java_process() -> None:
    b = EmbeddedBroker()
    pid = None
    try:
        b.start()
        pid = b.pid
        data_dir = b.data_dir
        assert pid is not None and not pid_gone(pid)
        b.stop()
        assert pid_gone(pid)
        assert not data_dir.exists()  # a temp data dir it created goes with it
        b.stop()  # idempotent
    finally:
        b.stop()
        kill_if_alive(pid)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_broker_dies_with_its_python_process(how: str, tmp_path: Path) -> None:
    """atexit covers a normal exit; PR_SET_PDEATHSIG covers a parent killed by a signal."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from clipstream.streams.broker import EmbeddedBroker
        b = EmbeddedBroker(data_dir={str(tmp_path / "kafka")!r})
        b.start()
        print(b.pid, flush=True)
        if {how!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)  # no stop(): atexit has to do it
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    pid = int(child.stdout.split()[0]) if child.stdout.strip() else None
    try:
        assert pid is not None, child.stderr[-3000:]
        wait_for(lambda: pid_gone(pid), 30, f"broker {pid} to die with its parent ({how})")
    finally:
        kill_if_alive(pid)


def test_detached_broker_lifecycle(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    pid = None
    try:
        state = start_detached(state_dir)
        pid = state["pid"]
        assert set(state) == {"pid", "bootstrap", "data_dir", "log"}
        assert (state_dir / "broker.json").is_file()
        assert status_detached(state_dir) == state
        assert start_detached(state_dir) == state  # the running one, not a second broker
        admin = AdminClient({"bootstrap.servers": state["bootstrap"]})
        assert admin.list_topics(timeout=10).brokers
        assert stop_detached(state_dir) is True
        wait_for(lambda: pid_gone(pid), 10, f"broker {pid} to be gone")
        assert status_detached(state_dir) is None
        assert stop_detached(state_dir) is False
    finally:
        stop_detached(state_dir)
        kill_if_alive(pid)


def _path_with(tmp_path: Path, tools: dict[str, str]) -> str:
    """A PATH holding only ``java`` (the real one) and the given fake scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = shutil.which("java")
    assert java is not None
    (bin_dir / "java").symlink_to(java)
    for name, body in tools.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return str(bin_dir)


def test_missing_mvn_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_with(tmp_path, {}))
    with pytest.raises(BrokerError, match="`mvn` not found on PATH"):
        resolve_jars(tmp_path / "libs")


def test_failing_mvn_shows_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = 'echo "[ERROR] Could not resolve dependencies for project"; exit 1'
    monkeypatch.setenv("PATH", _path_with(tmp_path, {"mvn": fake}))
    libs = tmp_path / "libs"
    with pytest.raises(BrokerError, match=r"(?s)exit 1.*Could not resolve dependencies"):
        resolve_jars(libs)
    assert not libs.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".libs-")]  # no staging left
