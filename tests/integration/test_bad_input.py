"""A fuzz run over a real broker with a real worker and replicas: every kind of bad input
gets a dead-letter record or an error prediction with a clear reason, misbehaving models
(raising, wrong shape, hanging past the deadline) cost only their own queries, and every
process keeps serving."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from clipstream.models.control import registry
from clipstream.models.files import save_model
from clipstream.models.training import digits_split
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import codec, topics
from tests.conftest import wait_for
from tests.integration import misbehaving_models as bad
from tests.integration.helpers import collect, read_all, wait_until_serving
from tests.integration.test_serving import metric

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GOOD = "digits-logreg"
MISBEHAVING = {
    "m-raises": bad.Raising(),
    "m-wrong-shape": bad.WrongShape(),
    "m-wrong-rows": bad.WrongRows(),
    "m-hangs": bad.Hanging(seconds=8.0),
}


@pytest.fixture(scope="module")
def deployed(kafka_settings, digits_models, tmp_path_factory):
    s = kafka_settings
    registry.deploy_model(s, GOOD, str(digits_models[GOOD][0]), input_dim=64)
    files = tmp_path_factory.mktemp("bad-models")
    for name, model in MISBEHAVING.items():
        path = save_model(model, files / f"{name}.skops")
        registry.deploy_model(s, name, str(path), input_dim=64, batch_max=16)
    registry.register_app(s, "good", [GOOD], deadline_ms=10_000, default_label="0")
    for name in ("m-raises", "m-wrong-shape", "m-wrong-rows"):
        registry.register_app(s, name, [name], deadline_ms=10_000, default_label="d")
    registry.register_app(s, "hang", ["m-hangs"], deadline_ms=400, default_label="7")
    registry.register_app(
        s, "mixed", [GOOD, "m-hangs"], policy="EXP4", deadline_ms=4000, default_label="7"
    )
    # an app whose model was never deployed (register_app refuses that; a stale or
    # hand-written control record does not)
    ghost = {**registry.current(s).app("good"), "models": ["never-deployed"]}
    registry.publish(s, {"kind": "APP", "name": "ghost", "model": None, "app": ghost})
    return s


def read_values(settings, topic: str, timeout: float = 20.0) -> list[bytes]:
    """Every message value on ``topic`` now, undecoded (it may hold junk on purpose)."""
    consumer = Consumer(settings.kafka(**{"group.id": f"raw-{time.time_ns()}"}))
    try:
        parts = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end])
        ends = {p: end for p, end in ends.items() if end}
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if not msg.error():
                    out.append(msg.value())
                    if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                        ends.pop(msg.partition(), None)
        return out
    finally:
        consumer.close()


def query_bytes(app: str, features: list[float], qid: str, **fields) -> bytes:
    record = {
        "query_id": qid,
        "app": app,
        "user": None,
        "features": features,
        "raw": None,
        "text": None,
        "sent_at_us": 0,
        "deadline_ms": None,
    }
    record.update(fields)
    return codec.encode("Query", record)


def test_every_kind_of_bad_input_gets_a_reason_and_the_processes_keep_serving(
    deployed, processes, capsys
):
    s = deployed
    env = {"PYTHONPATH": str(ROOT)}
    worker_port = free_port()
    worker = processes("worker", "worker", "--metrics-port", str(worker_port), env=env)
    replicas = [processes("replica-good", "replica", "--model", GOOD, env=env)]
    for name, model in MISBEHAVING.items():
        trusted = bad.type_name(type(model))
        replicas.append(
            processes(name, "replica", "--model", name, "--trusted-type", trusted, env=env)
        )
    client, reader = Client(s), PredictionReader(s)
    _, X, _, _ = digits_split()
    wait_until_serving(client, reader, "good", X[0].tolist())

    rng = random.Random(6)
    raw = Producer(s.kafka())
    expect: dict[str, str] = {}  # query id -> what its prediction must say
    garbage: list[bytes] = []  # undecodable: a dead letter with these bytes
    good: set[str] = set()

    def send(value: bytes, qid: str | None, outcome: str | None) -> None:
        raw.produce(topics.QUERIES, value, (qid or "x").encode())
        if qid is None:
            garbage.append(value)
        elif outcome is None:
            good.add(qid)
        else:
            expect[qid] = outcome

    row = X[1].tolist()
    for i in range(120):
        kind = i % 12
        qid = f"fuzz-{i}"
        if kind == 0:
            send(rng.randbytes(rng.randint(0, 100)), None, None)
        elif kind == 1:
            data = query_bytes("good", row, qid)
            send(data[: rng.randint(0, len(data) - 1)], None, None)
        elif kind == 2:  # a valid record of the wrong schema
            fb = {"query_id": qid, "app": "good", "user": None, "label": "1", "reward": None}
            send(codec.encode("Feedback", fb), None, None)
        elif kind == 3:
            send(query_bytes(f"no-such-app-{i}", row, qid), qid, "unknown app")
        elif kind == 4:
            send(query_bytes("good", [], qid), qid, "no input")
        elif kind == 5:
            send(query_bytes("good", [1.0] * rng.randint(65, 20_000), qid), qid, "expected 64")
        elif kind == 6:
            bad_row = list(row)
            bad_row[rng.randrange(64)] = rng.choice([float("nan"), float("inf"), -float("inf")])
            send(query_bytes("good", bad_row, qid), qid, "NaN or inf")
        elif kind == 7:
            send(query_bytes("good", row, qid, deadline_ms=-1), qid, "deadline_ms")
        elif kind == 8:
            send(query_bytes("ghost", row, qid), qid, "not deployed")
        elif kind == 9:
            send(query_bytes("m-raises", row, qid), qid, "this model always fails")
        elif kind == 10:
            model = rng.choice(["m-wrong-shape", "m-wrong-rows"])
            send(query_bytes(model, row, qid), qid, "model " + model)
        else:
            send(query_bytes("good", X[i].tolist(), qid), qid, None)
    raw.flush(30)
    # garbage on the other topics the processes read
    junk_response, junk_batch = b"\xc3\x01junk response", b"not a model batch"
    raw.produce(topics.RESPONSES, junk_response, b"j", partition=0)
    raw.produce(topics.model_requests(GOOD), junk_batch, b"j")
    unknown_version = {
        "batch_id": "unknown-version-batch",
        "model": GOOD,
        "version": 99,
        "reply_partition": 0,
        "query_ids": ["nobody"],
        "rows": 1,
        "cols": 64,
        "inputs": np.asarray([row], dtype="<f8").tobytes(),
        "sent_at_us": 0,
        "deadline_at_us": 0,
    }
    raw.produce(topics.model_requests(GOOD), codec.encode("ModelBatch", unknown_version), b"u")
    raw.flush(30)
    client.send_feedback("never-asked", "good", label="1")
    client.flush()

    wanted = set(expect) | good
    got = collect(reader, wanted, timeout=120)
    assert set(got) == wanted, f"no prediction for {sorted(wanted - set(got))[:10]}"
    assert all(len(v) == 1 for v in got.values()), "a query got more than one prediction"
    preds = {q: v[0] for q, v in got.items()}
    wrong = [
        (qid, outcome, preds[qid])
        for qid, outcome in expect.items()
        if not (preds[qid]["error"] and outcome in preds[qid]["error"])
        # an error or the default, never an answer
        or preds[qid]["label"] not in (None, "0", "d")
    ]
    assert not wrong, wrong
    for qid in good:
        assert preds[qid]["error"] is None and not preds[qid]["default"], preds[qid]

    # a model that hangs costs only its own queries: those get the default at the deadline
    # while queries to other models, sent at the same time, get model answers
    hang_ids = [client.send_query("hang", X[i].tolist()) for i in range(20)]
    mixed_ids = [client.send_query("mixed", X[i].tolist()) for i in range(20)]
    alongside = [client.send_query("good", X[i].tolist()) for i in range(20, 40)]
    client.flush()
    wanted = {*hang_ids, *mixed_ids, *alongside}
    got = collect(reader, wanted, timeout=120)
    assert set(got) == wanted, f"no prediction for {sorted(wanted - set(got))[:10]}"
    assert all(len(v) == 1 for v in got.values()), "a query got more than one prediction"
    preds = {q: v[0] for q, v in got.items()}
    for qid in alongside:
        assert preds[qid]["error"] is None and not preds[qid]["default"], preds[qid]
    for qid in hang_ids:
        assert preds[qid]["default"] and preds[qid]["label"] == "7", preds[qid]
    for qid in mixed_ids:  # a partial ensemble: the good model's answer, by the deadline
        p = preds[qid]
        assert p["models"] == [f"{GOOD}@1"] and not p["default"], p
        hung = [a for a in p["answers"] if a["model"] == "m-hangs"]
        assert hung and "deadline" in hung[0]["error"]

    letters = wait_for(
        lambda: (
            lambda d: (
                d
                if {x["value"] for x in d} >= {*garbage, junk_response, junk_batch}
                and any("unknown or expired query" in x["reason"] for x in d)
                else None
            )
        )(read_all(s, topics.DEADLETTER, "DeadLetter")),
        60,
        "dead letters for every undecodable message",
    )
    by_value = {d["value"]: d for d in letters}
    assert all(by_value[v]["reason"] for v in garbage)
    assert by_value[junk_response]["stage"] == "merge"
    assert by_value[junk_batch]["stage"] == "replica"
    rejected = {d["query_id"] for d in letters if d["query_id"]}
    for qid, outcome in expect.items():  # rejected at intake: a dead letter too
        if outcome in ("unknown app", "no input", "expected 64", "deadline_ms"):
            assert qid in rejected, qid
    answers = [
        codec.decode("ModelBatchResult", v)
        for v in read_values(s, topics.RESPONSES)
        if codec.kind_of(v, ("ModelBatchResult",))
    ]
    (answer,) = [a for a in answers if a["batch_id"] == "unknown-version-batch"]
    assert "has no version 99" in answer["errors"][0]

    # every process is still up and serving, and nothing is left pending in the worker
    assert worker.alive() and all(r.alive() for r in replicas)
    after = wait_until_serving(client, reader, "good", X[5].tolist(), timeout=60)
    assert after["error"] is None and after["label"] is not None
    wait_for(
        lambda: metric(worker_port, "clipstream_pending_queries") == 0,
        30,
        "the worker's pending queries to drain",
    )
    tried = len(expect) + len(good) + len(garbage) + 3 + 1 + 60
    with capsys.disabled():
        print(f"\nbad input over the broker: {tried} inputs tried, each answered or dead-lettered")
