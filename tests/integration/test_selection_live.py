"""The model selection layer over a real broker: Exp4 learning from feedback, deadlines
with stragglers, weights surviving a worker crash, and replay."""

from __future__ import annotations

import pytest

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.learning.replay import replay
from clipstream.streams.sdk import Client, PredictionReader
from tests.conftest import wait_for
from tests.integration.helpers import collect, learnt_everything, wait_until_serving

pytestmark = pytest.mark.integration

BEST, MIDDLE, WEAK = "digits-svc", "digits-tree", "digits-weak"
MODELS = [BEST, MIDDLE, WEAK]


@pytest.fixture(scope="module")
def deployed(kafka_settings, digits_models):
    for name in [*MODELS, "digits-logreg"]:
        registry.deploy_model(kafka_settings, name, str(digits_models[name][0]), input_dim=64)
    return kafka_settings


def weights_of(prediction: dict) -> dict[str, float]:
    """The weights the worker used for a query (each answer carries its model's weight)."""
    return {a["model"]: a["prob"] for a in prediction["answers"]}


def stream_with_feedback(client, reader, app, X, y, timeout=60) -> dict[str, dict]:
    """Predictions by query id, in the order the queries were sent (each with its truth)."""
    truth = {client.send_query(app, x.tolist()): str(label) for x, label in zip(X, y, strict=True)}
    client.flush()
    got = collect(reader, set(truth), timeout)
    assert set(got) == set(truth) and all(len(v) == 1 for v in got.values())
    for qid, label in truth.items():
        client.send_feedback(qid, app, label=label)
    client.flush()
    return {q: {**got[q][0], "truth": label} for q, label in truth.items()}


def probe(client, reader, app, x) -> dict:
    qid = client.send_query(app, x.tolist(), deadline_ms=20_000)
    client.flush()
    return collect(reader, {qid}, 30)[qid][0]


def test_exp4_learns_shifts_away_survives_restart_and_replays(deployed, processes):
    app = "ensemble"
    registry.register_app(
        deployed,
        app,
        MODELS,
        policy="EXP4",
        deadline_ms=3000,
        default_label="0",
        eta=0.2,
        cache=False,
    )
    worker = processes("worker", "worker")
    replicas = {m: processes(f"replica-{m}", "replica", "--model", m) for m in MODELS}
    client, reader = Client(deployed), PredictionReader(deployed)
    _, X, _, y = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())

    first = stream_with_feedback(client, reader, app, X[:300], y[:300])
    accuracy = sum(p["label"] == p["truth"] for p in first.values()) / 300
    wait_for(lambda: learnt_everything(deployed), 60, "the worker to apply all feedback")
    learned = weights_of(probe(client, reader, app, X[300]))
    assert max(learned, key=learned.get) == BEST, learned
    assert learned[BEST] > 0.5 and learned[WEAK] < 0.1, learned
    assert accuracy > 0.9

    # the weights are in the table's changelog: a crashed worker's successor has them
    worker.kill()
    processes("worker-2", "worker")
    after = weights_of(probe(client, reader, app, X[301]))
    assert after == pytest.approx(learned, rel=1e-9)

    # replaying the feedback topic into a fresh app gives the live weights
    fresh = "ensemble-replayed"
    registry.register_app(
        deployed,
        fresh,
        MODELS,
        policy="EXP4",
        deadline_ms=3000,
        default_label="0",
        eta=0.2,
        cache=False,
    )
    states, counts = replay(deployed, app, into=fresh)
    assert counts["applied"] == 300
    assert states[fresh].weights() == pytest.approx(learned, rel=1e-9)
    wait_for(
        lambda: (
            weights_of(probe(client, reader, fresh, X[302])) == pytest.approx(learned, rel=1e-9)
        ),
        30,
        "the replayed state to be installed",
    )
    again, _ = replay(deployed, app, into=fresh)  # idempotent: same state as once
    assert again[fresh].weights() == states[fresh].weights()

    # the best model fails mid-stream: its answers stop, weights move, the app answers on
    replicas[BEST].kill()
    second = stream_with_feedback(client, reader, app, X[303:483], y[303:483], timeout=90)
    assert not any(p["default"] for p in second.values())
    assert all(f"{BEST}@1" not in p["models"] for p in list(second.values())[-50:])
    wait_for(lambda: learnt_everything(deployed), 60, "the worker to apply all feedback")
    shifted = weights_of(probe(client, reader, app, X[483]))
    assert shifted[BEST] < learned[BEST] / 2, (learned, shifted)
    assert max(shifted, key=shifted.get) == MIDDLE, shifted


def test_stragglers_get_partial_ensembles_or_the_default_by_the_deadline(deployed, processes):
    registry.deploy_model(deployed, "digits-ghost", "/dev/null", input_dim=64)  # no replica
    registry.register_app(
        deployed,
        "partial",
        ["digits-logreg", "digits-ghost"],
        policy="EXP4",
        deadline_ms=400,
        default_label="7",
        cache=False,
    )
    registry.register_app(
        deployed, "nobody", ["digits-ghost"], deadline_ms=400, default_label="7", cache=False
    )
    processes("worker", "worker")
    processes("replica-logreg", "replica", "--model", "digits-logreg")
    client, reader = Client(deployed), PredictionReader(deployed)
    _, X, _, _ = digits_split()
    registry.register_app(deployed, "warm", ["digits-logreg"], deadline_ms=400)
    wait_until_serving(client, reader, "warm", X[0].tolist())

    partial = {client.send_query("partial", x.tolist()) for x in X[1:41]}
    nobody = {client.send_query("nobody", x.tolist()) for x in X[41:61]}
    client.flush()
    got = collect(reader, partial | nobody, timeout=30)
    # a second prediction would come after the deadline: listen a while longer for one
    got_late = collect(reader, partial | nobody, timeout=1.5)
    assert set(got) == partial | nobody
    assert all(len(v) == 1 for v in got.values()) and not got_late
    for qid in partial:
        p = got[qid][0]
        assert p["models"] == ["digits-logreg@1"] and not p["default"]
        assert p["emitted_at_us"] - p["sent_at_us"] < 400_000 + 500_000
    for qid in nobody:
        p = got[qid][0]
        assert p["default"] is True and p["label"] == "7" and p["models"] == []
        assert p["emitted_at_us"] - p["sent_at_us"] < 400_000 + 500_000
