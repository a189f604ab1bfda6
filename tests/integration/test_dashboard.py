"""Every metric the Grafana dashboard queries is exported by a running worker or replica:
declared by the process, and for all but the rare-event counters, carrying samples after
real traffic (queries over Kafka and REST, feedback, garbage, a deadline miss)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Producer

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.ops.status import scrape
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import collect, wait_until_serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "clipstream.json").read_text())
APP, LONELY = "digits-dash", "digits-dash-lonely"
MODEL, ORPHAN = "digits-logreg", "digits-tree"
# Counters that only move on faults this test does not cause; they must still be declared.
RARE = {
    "clipstream_replica_row_errors_total",
    "clipstream_late_answers_total",
    "clipstream_gateway_timeouts_total",
}


def dashboard_queries() -> dict[str, str]:
    """Metric name -> the first expression that uses it (Prometheus' own `up` excluded)."""
    found: dict[str, str] = {}
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(clipstream_[a-z0-9_]+)", target["expr"]):
                found.setdefault(name, target["expr"])
    return found


def declared(url: str) -> set[str]:
    """Queryable sample names of every metric family a process declares (# TYPE lines)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names |= (
            {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        )
    return names


def test_every_dashboard_metric_is_exported_by_the_processes(
    kafka_settings: Settings, digits_models, processes
) -> None:
    s = kafka_settings
    queries = dashboard_queries()
    assert len(queries) >= 15  # the dashboard covers the worker, the replicas and selection
    registry.deploy_model(s, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    registry.deploy_model(s, ORPHAN, str(digits_models[ORPHAN][0]), input_dim=64)
    registry.register_app(s, APP, [MODEL], policy="EXP3", deadline_ms=5000)
    registry.register_app(s, LONELY, [ORPHAN], deadline_ms=200, default_label="1")
    worker_port, replica_port, web_port = free_port(), free_port(), free_port()
    ports = ("--metrics-port", str(worker_port), "--web-port", str(web_port))
    processes("worker", "worker", *ports, env={"CLIPSTREAM_GATEWAY_AUTH": "open"})
    processes("replica", "replica", "--model", MODEL, "--metrics-port", str(replica_port))

    client, reader = Client(s), PredictionReader(s)
    _, X_test, _, y_test = digits_split()
    wait_until_serving(client, reader, APP, X_test[0].tolist())
    rows = zip(X_test[:20], y_test[:20], strict=True)
    qids = {client.send_query(APP, x.tolist()): str(y) for x, y in rows}
    qids[client.send_query(APP, X_test[0].tolist())] = str(y_test[0])  # a cache hit
    lonely = client.send_query(LONELY, X_test[0].tolist())  # nobody serves it: the default
    client.flush()
    raw = Producer(s.kafka())
    raw.produce(topics.QUERIES, b"\x00garbage", b"garbage")  # a dead letter
    raw.flush(10)
    got = collect(reader, {*qids, lonely}, timeout=60)
    reader.close()
    assert got[lonely][0]["default"] is True
    for qid, label in qids.items():
        client.send_feedback(qid, APP, label=label)
    client.flush()
    request = urllib.request.Request(
        f"http://127.0.0.1:{web_port}/apps/{APP}/predict",
        data=json.dumps({"features": X_test[3].tolist()}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200

    urls = [f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{replica_port}"]
    exported = declared(urls[0]) | declared(urls[1])
    missing = {name: expr for name, expr in queries.items() if name not in exported}
    assert not missing, f"the dashboard queries metrics no process exports: {missing}"

    absent: set[str] = set(queries)

    def with_samples() -> bool:
        names = {name for one in urls for (name, _labels) in scrape(one)}
        absent.intersection_update(set(queries) - RARE - names)
        return not absent

    try:
        wait_for(with_samples, 30, "samples of every dashboard metric", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: no samples of {sorted(absent)}") from None
