"""`clipstream status` against a running worker and replicas on the real broker: the
registry's apps and versions, live replicas from the consumer groups, their lag draining
to zero, batch sizes, cache hits, latency quantiles and the learned Exp4 weights."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import clipstream_command
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import collect, wait_until_serving

pytestmark = pytest.mark.integration

APP = "digits-status"
GOOD, WEAK = "digits-logreg", "digits-weak"


def status(
    settings: Settings, urls: list[str], *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **(env or {}),
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "CLIPSTREAM_METRICS_URLS": ",".join(urls[1:]),
    }
    # one URL by flag, the others from the environment: both ways of naming processes
    args = clipstream_command("status", "--metrics-url", urls[0], *extra)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_status_shows_registry_replicas_lag_batches_cache_latency_and_weights(
    kafka_settings: Settings, digits_models, processes
) -> None:
    s = kafka_settings
    registry.deploy_model(s, GOOD, str(digits_models[GOOD][0]), input_dim=64)
    registry.deploy_model(s, GOOD, str(digits_models[GOOD][0]), input_dim=64)  # v2
    registry.deploy_model(s, WEAK, str(digits_models[WEAK][0]), input_dim=64)
    registry.register_app(s, APP, [GOOD, WEAK], policy="EXP4", deadline_ms=5000, eta=0.5)
    ports = [free_port() for _ in range(4)]
    processes("worker", "worker", "--metrics-port", str(ports[0]))
    processes("good-1", "replica", "--model", GOOD, "--metrics-port", str(ports[1]))
    processes("good-2", "replica", "--model", GOOD, "--metrics-port", str(ports[2]))
    processes("weak", "replica", "--model", WEAK, "--metrics-port", str(ports[3]))
    urls = [f"http://127.0.0.1:{p}" for p in ports]

    client, reader = Client(s), PredictionReader(s)
    _, X_test, _, y_test = digits_split()
    wait_until_serving(client, reader, APP, X_test[0].tolist())
    sent = {}
    for x, y in zip(X_test[:60], y_test[:60], strict=True):
        sent[client.send_query(APP, x.tolist())] = str(y)
    repeat = client.send_query(APP, X_test[0].tolist())  # a cache hit for both models
    client.flush()
    got = collect(reader, {*sent, repeat}, timeout=60)
    reader.close()
    assert set(got) == {*sent, repeat}
    for qid, label in sent.items():
        client.send_feedback(qid, APP, label=label)
    client.flush()

    def learned() -> dict | None:
        run = status(s, urls, "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        (app,) = report["apps"]
        weights = app["weights"].get(APP, {})
        models = {m["model"]: m for m in report["models"]}
        settled = (
            weights.get(GOOD, 0) > weights.get(WEAK, 1)
            and models[GOOD]["replicas"] == 2
            and models[GOOD]["lag"] == 0
            and models[WEAK]["lag"] == 0
        )
        return report if settled else None

    report = wait_for(learned, 90, "status to show the learned weights, 2 replicas, no lag")
    assert all(p["up"] for p in report["processes"])
    models = {m["model"]: m for m in report["models"]}
    assert models[GOOD]["serving"] == 2 and models[GOOD]["versions"] == [1, 2]
    assert models[WEAK]["replicas"] == 1
    for name in (GOOD, WEAK):
        m = models[name]
        assert m["batch_mean"] >= 1 and m["replica_batch_mean"] >= 1
        assert m["rows"] >= 60  # both replicas' rows add up
        assert 0 < m["cache_hit_rate"] < 1
    (app,) = report["apps"]
    assert (app["app"], app["policy"], app["models"]) == (APP, "EXP4", [GOOD, WEAK])
    assert app["predictions"] >= 62
    assert 0 < app["p50_ms"] <= app["p99_ms"]
    assert sum(app["weights"][APP].values()) == pytest.approx(1.0, abs=1e-6)

    # the terminal table names the same things, and a dead endpoint is reported, not fatal
    table = status(s, [*urls, "http://127.0.0.1:1"], env={"COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    for word in (APP, GOOD, WEAK, "EXP4", "v2", "no:"):
        assert word in table.stdout, word
