"""librdkafka's own log lines go through Python logging (logger ``clipstream.librdkafka``) instead
of straight to stderr, at the level --log-level chose; its warnings, which it recovers
from by retrying, show from info (issue 13)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from clipstream.streams.ops import cli
from clipstream.streams.wire.config import KAFKA_LOGGER, Settings


@pytest.fixture
def kafka_logger_level() -> Iterator[None]:
    logger = logging.getLogger(KAFKA_LOGGER)
    before = logger.level
    yield
    logger.setLevel(before)


def test_librdkafka_logs_through_python_logging_not_stderr(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: the client logs refused connections
    settings = Settings(bootstrap=f"127.0.0.1:{port}")
    assert settings.kafka()["logger"] is logging.getLogger(KAFKA_LOGGER)
    caplog.set_level(logging.DEBUG, logger=KAFKA_LOGGER)
    producer = Producer(settings.kafka())
    deadline = time.monotonic() + 10
    while not any("Connection refused" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "librdkafka logged nothing through Python"
        producer.poll(0.1)  # log lines are delivered by poll()
    refused = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert refused[0].name == KAFKA_LOGGER and refused[0].levelno == logging.ERROR
    assert "rdkafka" not in capfd.readouterr().err  # librdkafka's %3|...|FAIL| lines


@pytest.mark.parametrize(
    ("chosen", "kafka_level"),
    [("debug", logging.DEBUG), ("info", logging.INFO), ("warning", logging.ERROR)],
)
def test_log_level_sets_librdkafkas_level(
    chosen: str, kafka_level: int, tmp_path: Path, kafka_logger_level: None
) -> None:
    result = CliRunner().invoke(
        cli.main,
        ["--log-level", chosen, "broker", "status"],
        env={"CLIPSTREAM_STATE_DIR": str(tmp_path)},
    )
    assert result.stdout == "not running\n"
    assert logging.getLogger(KAFKA_LOGGER).level == kafka_level
