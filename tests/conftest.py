"""Shared fixtures: a real Kafka broker per test module, trained digits models, and
worker/replica processes that are always stopped, also when a test fails."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.wire.config import Settings


@pytest.fixture(scope="module")
def kafka_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a fresh embedded broker on a free port (one per test module)."""
    from confluent_kafka.admin import AdminClient

    from clipstream.streams.broker import EmbeddedBroker
    from clipstream.streams.wire import topics

    broker = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        settings = Settings(bootstrap=broker.bootstrap, partitions=4, replica_partitions=4)
        topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan(4).core())
        yield settings
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, float]]:
    from clipstream.models.training import train_digits_models

    return train_digits_models(tmp_path_factory.mktemp("models"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    # kept on the item so fixtures can tell, at teardown, whether the test body failed
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def processes(
    kafka_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Child]]:
    """Start clipstream CLI processes against the test broker; all are stopped at the end."""
    started: list[Child] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        full_env = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap(),
            "CLIPSTREAM_PARTITIONS": str(kafka_settings.partitions),
        }
        full_env.update(env or {})
        child = spawn(name, clipstream_command(*args), tmp_path / "logs", full_env)
        started.append(child)
        return child

    yield start
    failed = []
    for child in started:
        if child.alive():
            child.stop()
        elif child.proc.returncode not in (0, -9, -15, None):
            failed.append(child)
    # a test that failed shows its processes' logs: a flake in CI is read from those alone
    call = getattr(request.node, "report_call", None)
    test_failed = call is not None and call.failed
    for child in started:
        if os.environ.get("CLIPSTREAM_TEST_LOGS") or failed or test_failed:
            print(f"--- {child.name} (exit {child.proc.returncode}) ---\n{child.log_tail(60)}")


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
