"""The model abstraction layer over a real broker: batching under load, the prediction
cache, versions, and replicas joining and dying while queries flow."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.sdk import Client, PredictionReader
from tests.conftest import wait_for
from tests.integration.helpers import collect, wait_until_serving

pytestmark = pytest.mark.integration

MODEL = "digits-logreg"


def scrape(port: int) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric(port: int, name: str) -> float:
    """Sum of a metric over its labels; 0 while the process is not serving metrics yet."""
    try:
        values = scrape(port)
    except OSError:
        return 0.0
    return sum(v for k, v in values.items() if k.split("{")[0] == name)


@pytest.fixture(scope="module")
def digits(kafka_settings, digits_models):
    path = str(digits_models[MODEL][0])
    registry.deploy_model(kafka_settings, MODEL, path, input_dim=64, latency_slo_ms=200)
    return kafka_settings


def test_batching_cache_and_versions(digits, digits_models, processes):
    app = "serving"
    registry.register_app(digits, app, [MODEL], deadline_ms=10_000)
    worker_port, replica_port = free_port(), free_port()
    processes("worker", "worker", "--metrics-port", str(worker_port))
    processes("replica", "replica", "--model", MODEL, "--metrics-port", str(replica_port))
    client, reader = Client(digits), PredictionReader(digits)
    _, X, _, _ = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())

    # a burst: the worker must batch it, not send one message per query
    ids = {client.send_query(app, x.tolist()) for x in X[1:401]}
    client.flush()
    got = collect(reader, ids, timeout=60)
    assert set(got) == ids and all(len(v) == 1 for v in got.values())
    batches = metric(replica_port, "clipstream_replica_batches_total")
    rows = metric(replica_port, "clipstream_replica_rows_total")
    assert rows >= 400 and rows / batches > 2, (rows, batches)
    assert metric(worker_port, "clipstream_batch_max") >= 1

    # the same input again is a cache hit: answered without the replica
    again = client.send_query(app, X[5].tolist())
    client.flush()
    hit = collect(reader, {again}, timeout=30)[again][0]
    assert hit["cache_hit"] is True and hit["models"] == [f"{MODEL}@1"]
    assert metric(replica_port, "clipstream_replica_rows_total") == rows
    assert metric(worker_port, "clipstream_cache_total") > 0

    # deploy v2 (another model file under the same name), then roll back to v1
    registry.deploy_model(digits, MODEL, str(digits_models["digits-weak"][0]), input_dim=64)

    rows_left = iter(X[401:])

    def served_by() -> str:
        qid = client.send_query(app, next(rows_left).tolist(), deadline_ms=10_000)
        client.flush()
        got = collect(reader, {qid}, timeout=30)
        if qid not in got:
            return "no prediction in 30 s"
        prediction = got[qid][0]
        return ",".join(prediction["models"]) or str(prediction["error"])

    seen: list[str] = []
    wait_for(
        lambda: seen.append(served_by()) or seen[-1] == f"{MODEL}@2",
        # generous: the replica loads version 2 on first use, and the machine is shared
        120,
        f"version 2 to serve (served by: {seen})",
    )
    registry.rollback_model(digits, MODEL)
    wait_for(lambda: served_by() == f"{MODEL}@1", 120, "the rollback to version 1")


def test_replicas_join_share_and_survive_kill_9(digits, processes):
    app = "scaling"
    registry.register_app(digits, app, [MODEL], deadline_ms=30_000, cache=False)
    processes("worker", "worker")
    ports = [free_port() for _ in range(3)]
    first = processes("replica-0", "replica", "--model", MODEL, "--metrics-port", str(ports[0]))
    client, reader = Client(digits), PredictionReader(digits)
    _, X, _, _ = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())

    sent: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a steady stream while the group changes under it
        i = 0
        while not stop.is_set():
            sent.append(client.send_query(app, X[i % len(X)].tolist()))
            i += 1
            stop.wait(0.004)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        for i in (1, 2):
            processes(f"replica-{i}", "replica", "--model", MODEL, "--metrics-port", str(ports[i]))
        wait_for(
            lambda: all(metric(p, "clipstream_replica_rows_total") > 0 for p in ports[1:]),
            60,
            "the new replicas to take a share of the batches",
        )
        first.kill()  # kill -9: its uncommitted batches go to the others
        n = len(sent)
        wait_for(lambda: len(sent) > n + 200, 30, "load to go on across the rebalance")
    finally:
        stop.set()
        thread.join()
    client.flush()
    got = collect(reader, set(sent), timeout=60)
    missing = set(sent) - set(got)
    assert not missing, f"{len(missing)} of {len(sent)} queries got no prediction"
    assert all(len(v) == 1 for v in got.values()), "a query got two predictions"
    assert not any(v[0]["error"] or v[0]["default"] for v in got.values())
