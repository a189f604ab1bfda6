"""One query's whole journey over a real broker: app -> queries -> worker -> model batch ->
replica -> responses -> worker -> predictions -> app; and bad input on the way."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import codec, topics
from tests.integration.helpers import collect, read_all, wait_until_serving

pytestmark = pytest.mark.integration

APP = "digits-e2e"
MODEL = "digits-logreg"


@pytest.fixture(scope="module")
def served(kafka_settings, digits_models):
    registry.deploy_model(kafka_settings, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    registry.register_app(
        kafka_settings, APP, [MODEL], policy="SINGLE", deadline_ms=5000, default_label="0"
    )
    return kafka_settings


def test_digits_test_set_is_predicted_once_per_query(served, digits_models, processes):
    processes("worker", "worker")
    processes("replica", "replica", "--model", MODEL)
    client = Client(served)
    reader = PredictionReader(served)
    _, X_test, _, y_test = digits_split()
    wait_until_serving(client, reader, APP, X_test[0].tolist())

    truth = {}
    for x, y in zip(X_test, y_test, strict=True):
        truth[client.send_query(APP, x.tolist())] = str(y)
    client.flush()
    got = collect(reader, set(truth), timeout=60)

    assert set(got) == set(truth), f"{len(set(truth) - set(got))} queries got no prediction"
    assert all(len(v) == 1 for v in got.values()), "a query got more than one prediction"
    predictions = {q: v[0] for q, v in got.items()}
    assert not any(p["default"] or p["error"] for p in predictions.values())
    assert all(p["models"] == [f"{MODEL}@1"] for p in predictions.values())
    accuracy = sum(p["label"] == truth[q] for q, p in predictions.items()) / len(truth)
    offline = digits_models[MODEL][1]
    # a model that answers at random, or answers for the wrong query id, misses this by far
    assert accuracy >= offline - 0.01, (accuracy, offline)


def test_malformed_queries_are_dead_lettered_and_the_worker_keeps_serving(served, processes):
    processes("worker", "worker")
    processes("replica", "replica", "--model", MODEL)
    client = Client(served)
    reader = PredictionReader(served)
    _, X_test, _, _ = digits_split()
    wait_until_serving(client, reader, APP, X_test[0].tolist())

    raw = Producer(served.kafka())
    garbage = b"\x00not avro at all\xff\xfe"
    raw.produce(topics.QUERIES, garbage, b"garbage")
    raw.flush(10)
    short = client.send_query(APP, [1.0, 2.0, 3.0])
    unknown = client.send_query("no-such-app", X_test[1].tolist())
    good = client.send_query(APP, X_test[2].tolist())
    client.flush()

    got = collect(reader, {short, unknown, good}, timeout=30)
    assert "expected 64 features" in got[short][0]["error"]
    assert got[short][0]["label"] is None
    assert "unknown app" in got[unknown][0]["error"]
    assert got[good][0]["error"] is None and got[good][0]["label"] is not None

    letters = read_all(served, topics.DEADLETTER, "DeadLetter")
    by_value = {d["value"]: d for d in letters}
    assert garbage in by_value
    assert "not a valid Avro Query" in by_value[garbage]["reason"]
    assert by_value[garbage]["stage"] == "intake"
    (short_letter,) = [d for d in letters if d["query_id"] == short]
    assert "expected 64 features" in short_letter["reason"]
    # the original bytes are kept: the query can be repaired and re-sent
    assert codec.decode("Query", short_letter["value"])["features"] == [1.0, 2.0, 3.0]
