"""Processes started in any order work (issue 15): on a fresh broker with no topics at all,
a replica started first says once that the control topic is missing, then that its model
is not deployed, and serves when the deploy arrives; a worker started before any app says
so and serves the app once it is registered. Nothing is restarted. And a bad control record
written behind the CLI's back leaves the worker serving on the last good spec (issue 14)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from sklearn.datasets import load_digits

from clipstream.streams.broker import EmbeddedBroker
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import Child
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.integration

MODEL = "digits-logreg"
FEATURES = ",".join(map(str, load_digits().data[0]))  # a zero


@pytest.fixture(scope="module")
def kafka_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A fresh broker and nothing else: unlike conftest's, no topic is created up front."""
    broker = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield Settings(bootstrap=broker.bootstrap, partitions=4, replica_partitions=4)
    finally:
        broker.stop()


def log(child: Child) -> str:
    return child.log_path.read_text(errors="replace")


def test_processes_started_in_any_order_serve_without_a_restart(
    kafka_settings: Settings,
    digits_models: dict[str, tuple[Path, float]],
    processes: Callable[..., Child],
) -> None:
    s = kafka_settings
    replica = processes("replica", "replica", "--model", MODEL)
    no_topic = "the control topic clipstream.control does not exist yet: waiting"
    wait_for(lambda: no_topic in log(replica), 60, "the replica to say the topic is missing")

    worker = processes("worker", "worker")  # creates the topics; no app registered yet
    no_app = "no app is registered yet: queries get an error prediction until one is"
    wait_for(lambda: no_app in log(worker), 90, "the worker to say no app is registered")
    not_deployed = f"model {MODEL} is not deployed: waiting for `clipstream model deploy {MODEL}"
    wait_for(lambda: not_deployed in log(replica), 60, "the replica to wait for the deploy")

    deployed = run_cli(
        s, "model", "deploy", MODEL, str(digits_models[MODEL][0]), "--input-dim", "64"
    )
    assert deployed.returncode == 0, deployed.stderr
    wait_for(lambda: f"model {MODEL} deployed: serving" in log(replica), 60, "the replica to serve")
    registered = run_cli(
        s, "app", "register", "digits", "--models", MODEL, "--deadline-ms", "30000",
        "--default-label=-1",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr

    answered = run_cli(s, "query", "digits", FEATURES, "--timeout", "90")
    assert answered.returncode == 0, answered.stderr
    prediction = json.loads(answered.stdout)
    assert prediction["label"] == "0" and not prediction["default"], prediction
    assert prediction["models"] == [f"{MODEL}@1"]

    # an error prediction is printed for scripts and is a failure in one line
    wrong = run_cli(s, "query", "digits", "1,2,3", "--timeout", "90")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["error"] == "expected 64 features for app 'digits', got 3"
    assert wrong.stderr.splitlines() == [
        "error: the worker answered with an error: expected 64 features for app 'digits', got 3"
    ]

    assert replica.alive() and worker.alive()
    # each said once, however long it waited
    assert log(replica).count(no_topic) == 1
    assert log(replica).count(not_deployed) == 1
    assert log(worker).count(no_app) == 1
    assert "Traceback" not in log(replica) + log(worker)


def test_a_replica_of_a_model_never_deployed_says_so_and_stops_cleanly(
    processes: Callable[..., Child],
) -> None:
    replica = processes("nosuch", "replica", "--model", "nosuch")
    waiting = "model nosuch is not deployed: waiting for `clipstream model deploy nosuch SOURCE`"
    wait_for(lambda: waiting in log(replica), 60, "the replica to say the model is missing")
    assert replica.alive()
    assert replica.stop() == 0  # SIGTERM while waiting: a clean exit
    assert "consume error" not in log(replica) and "Traceback" not in log(replica)


def refused(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith('clipstream_control_refused_total{kind="app"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_bad_control_record_leaves_the_worker_on_the_last_good_spec(
    kafka_settings: Settings,
    digits_models: dict[str, tuple[Path, float]],
    processes: Callable[..., Child],
) -> None:
    s = kafka_settings
    model = "guard-logreg"
    deployed = run_cli(
        s, "model", "deploy", model, str(digits_models[MODEL][0]), "--input-dim", "64"
    )
    assert deployed.returncode == 0, deployed.stderr
    good = {
        "models": [model], "policy": "EXP3", "deadline_ms": 30000.0, "default_label": "-1",
        "personalised": False, "input_dim": 64, "eta": 0.1, "gamma": 0.05, "cache": False,
    }  # fmt: skip
    registered = run_cli(
        s, "app", "register", "guarded", "--models", model, "--policy", "exp3",
        "--deadline-ms", "30000", "--default-label=-1", "--no-cache", "--input-dim", "64",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    port = free_port()
    worker = processes("worker", "worker", "--metrics-port", str(port))
    processes("replica", "replica", "--model", model)
    first = run_cli(s, "query", "guarded", FEATURES, "--timeout", "90")
    assert first.returncode == 0, first.stderr

    # written behind the CLI's back (an older release, a hand-made tool): the CLI refuses it
    bad = {"kind": "APP", "name": "guarded", "model": None, "app": {**good, "gamma": 2.0}}
    assert (
        "gamma must be a number in [0, 1], got 2.0"
        in run_cli(
            s, "app", "register", "guarded", "--models", model, "--policy", "exp3", "--gamma", "2"
        ).stderr
    )
    producer = Producer(s.kafka())
    producer.produce(topics.CONTROL, codec.encode("ControlRecord", bad), b"app:guarded")
    assert producer.flush(30) == 0
    wait_for(lambda: refused(port) == 1.0, 60, "the worker to refuse the record")

    again = run_cli(s, "query", "guarded", FEATURES, "--timeout", "90")
    assert again.returncode == 0, again.stderr
    prediction = json.loads(again.stdout)
    assert prediction["error"] is None and prediction["models"] == [f"{model}@1"], prediction
    reason = "refused, the last good spec stays: app guarded: gamma must be a number in [0, 1]"
    assert log(worker).count(reason) == 1
