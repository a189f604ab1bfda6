"""The worker's query path without Kafka: a recording producer stands in for the client
library (not for the broker; the integration tests use the real one)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.registry import Registry
from streams import codec, topics
from streams.config import Settings
from streams.pipeline import DictStateStore, Pipeline, RawQuery, now_us


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, dict[str, Any]]] = []
        self._callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **kw: Any) -> None:
        self.sent.append((topic, value, key, kw))
        if kw.get("on_delivery"):
            self._callbacks.append(kw["on_delivery"])

    def poll(self, timeout: float = 0) -> int:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(None, None)
        return len(callbacks)

    def on(self, topic: str, kind: str) -> list[dict[str, Any]]:
        return [codec.decode(kind, v) for t, v, _, _ in self.sent if t == topic]


def make_registry(policy: str = "SINGLE", models: tuple[str, ...] = ("m1",)) -> Registry:
    reg = Registry()
    for name in models:
        reg.apply(
            {
                "kind": "MODEL",
                "name": name,
                "deleted": False,
                "app": None,
                "model": {
                    "version": 1,
                    "partitions": 2,
                    "batch_max": 4,
                    "batch_wait_ms": 1.0,
                    "latency_slo_ms": 20.0,
                    "versions": [
                        {
                            "version": 1,
                            "path": "/x",
                            "format": "skops",
                            "method": "predict_proba",
                            "input_dim": 3,
                            "deployed_at_us": 0,
                        }
                    ],
                },
            }
        )
    reg.apply(
        {
            "kind": "APP",
            "name": "app",
            "deleted": False,
            "model": None,
            "app": {
                "models": list(models),
                "policy": policy,
                "deadline_ms": 50.0,
                "default_label": "dflt",
                "personalised": False,
                "input_dim": 3,
                "eta": 0.1,
                "gamma": 0.05,
                "cache": True,
            },
        }
    )
    return reg


def query(
    qid: str, features: list[float], sent: int | None = None, deadline_ms: float | None = None
) -> bytes:
    return codec.encode(
        "Query",
        {
            "query_id": qid,
            "app": "app",
            "user": None,
            "features": features,
            "raw": None,
            "text": None,
            "sent_at_us": sent or now_us(),
            "deadline_ms": deadline_ms,
        },
    )


def answer_batches(
    pipe: Pipeline, producer: RecordingProducer, label: str = "1", only: str | None = None
) -> int:
    """Play a replica: answer the batches sent so far (to model ``only``, if given)."""

    def wanted(sent: tuple) -> bool:
        topic = sent[0]
        return topic.endswith(".requests") and (
            only is None or topic == f"clipstream.model.{only}.requests"
        )

    requests = [s for s in producer.sent if wanted(s)]
    producer.sent = [s for s in producer.sent if not wanted(s)]
    for _, value, _, _ in requests:
        batch = codec.decode("ModelBatch", value)
        result = result_for(batch, label)
        pipe.on_result(codec.encode("ModelBatchResult", result), batch["reply_partition"])
    return len(requests)


def result_for(batch: dict, label: str = "1") -> dict:
    """A replica's answer to ``batch``: ``label`` with score 0.8 for every row."""
    rows = batch["rows"]
    return {
        "batch_id": batch["batch_id"],
        "model": batch["model"],
        "version": batch["version"],
        "replica": "r",
        "query_ids": batch["query_ids"],
        "labels": [label] * rows,
        "classes": ["0", "1"],
        "scores": np.tile([0.2, 0.8], (rows, 1)).tobytes(),
        "errors": [None] * rows,
        "batch_sent_at_us": batch["sent_at_us"],
        "model_us": 100,
    }


@pytest.fixture
def setup() -> tuple[Pipeline, RecordingProducer, list[str]]:
    producer = RecordingProducer()
    pipe = Pipeline(
        Settings(bootstrap="unused:1"),
        make_registry(),
        producer,
        DictStateStore(),
        rng=np.random.default_rng(0),
    )
    return pipe, producer, []


def test_each_query_gets_one_prediction_and_is_acked_after_delivery(setup) -> None:
    pipe, producer, acked = setup
    # The test steps a made-up clock for the batch window, but answers are stamped with the
    # real one; a long deadline keeps a slow (shared) machine from turning them into defaults.
    raws = [
        RawQuery(
            query(f"q{i}", [1.0, 2.0, float(i)], deadline_ms=60_000),
            b"app",
            0,
            i,
            lambda i=i: acked.append(f"q{i}"),
        )
        for i in range(10)
    ]
    start = now_us()
    pipe.on_queries(raws, start)
    assert not producer.on(topics.PREDICTIONS, "Prediction")
    assert acked == []  # nothing acked before its prediction exists
    batches = producer.on(topics.model_requests("m1"), "ModelBatch")
    # full batches of the AIMD limit (4) go at once, while the model has free slots (2)
    assert [b["rows"] for b in batches] == [4, 4]
    pipe.tick(start + 1_500)
    # the window ran out, but both slots are taken: the last 2 rows wait here, not in Kafka
    assert [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")] == [4, 4]
    assert answer_batches(pipe, producer) == 2
    # with the model idle again the waiting rows go out
    assert [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")] == [2]
    assert answer_batches(pipe, producer) == 1
    pipe.tick(now_us())  # poll delivery callbacks
    preds = producer.on(topics.PREDICTIONS, "Prediction")
    assert sorted(p["query_id"] for p in preds) == sorted(f"q{i}" for i in range(10))
    assert all(p["label"] == "1" and p["score"] == pytest.approx(0.8) for p in preds)
    assert sorted(acked) == sorted(f"q{i}" for i in range(10))


def test_duplicate_query_ids_and_late_answers_do_not_emit_twice(setup) -> None:
    pipe, producer, _ = setup
    pipe.on_queries([RawQuery(query("q", [1, 2, 3]), b"app", 0, 0)])
    pipe.on_queries([RawQuery(query("q", [1, 2, 3]), b"app", 0, 1)])  # redelivered
    batches = producer.on(topics.model_requests("m1"), "ModelBatch")
    answer_batches(pipe, producer)
    for batch in batches:  # the same answer again, as after a replica crash
        result = {
            "batch_id": batch["batch_id"],
            "model": "m1",
            "version": 1,
            "replica": "r2",
            "query_ids": batch["query_ids"],
            "labels": ["1"],
            "classes": ["0", "1"],
            "scores": np.array([[0.2, 0.8]]).tobytes(),
            "errors": [None],
            "batch_sent_at_us": 0,
            "model_us": 1,
        }
        pipe.on_result(codec.encode("ModelBatchResult", result), 0)
    pipe.on_queries([RawQuery(query("q", [1, 2, 3]), b"app", 0, 2)])  # after emission
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["q"]
    assert pipe.counts["duplicates"] == 2
    assert pipe.counts["late_answers"] == 1


def test_deadline_emits_default_output_once(setup) -> None:
    pipe, producer, _ = setup
    start = now_us()
    pipe.on_queries([RawQuery(query("slow", [1, 2, 3], sent=start), b"app", 0, 0)], start)
    pipe.tick(start + 10_000)
    assert not producer.on(topics.PREDICTIONS, "Prediction")
    pipe.tick(start + 51_000)
    (pred,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert pred["default"] is True and pred["label"] == "dflt" and pred["query_id"] == "slow"
    answer_batches(pipe, producer)  # the model answers after the deadline
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 1


def test_cache_hit_answers_without_a_batch(setup) -> None:
    pipe, producer, _ = setup
    pipe.on_queries([RawQuery(query("a", [1, 2, 3]), b"app", 0, 0)])
    answer_batches(pipe, producer)
    pipe.on_queries([RawQuery(query("b", [1, 2, 3]), b"app", 0, 1)])
    assert not producer.on(topics.model_requests("m1"), "ModelBatch")
    preds = {p["query_id"]: p for p in producer.on(topics.PREDICTIONS, "Prediction")}
    assert preds["b"]["cache_hit"] is True and preds["b"]["label"] == "1"
    assert preds["a"]["cache_hit"] is False


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x01\x02garbage", "not a valid Avro Query"),
        (b"", "empty message"),
    ],
)
def test_undecodable_query_is_dead_lettered_and_acked(setup, value, reason) -> None:
    pipe, producer, acked = setup
    pipe.on_queries([RawQuery(value, b"k", 3, 7, lambda: acked.append("x"))])
    pipe.tick()
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")
    assert reason in letter["reason"] and letter["value"] == value
    assert (letter["partition"], letter["offset"], letter["stage"]) == (3, 7, "intake")
    assert acked == ["x"]


def test_wrong_dimension_gets_error_prediction_and_dead_letter(setup) -> None:
    pipe, producer, _ = setup
    pipe.on_queries([RawQuery(query("bad", [1.0]), b"app", 0, 0)])
    (pred,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert pred["query_id"] == "bad" and "expected 3 features" in pred["error"]
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")
    assert letter["query_id"] == "bad"


def test_a_straggler_is_recorded_in_the_answers_and_remembered_as_a_loss() -> None:
    producer = RecordingProducer()
    pipe = Pipeline(
        Settings(bootstrap="unused:1"),
        make_registry("EXP4", ("m1", "m2")),
        producer,
        DictStateStore(),
    )
    start = now_us()
    pipe.on_queries([RawQuery(query("q", [1, 2, 3], sent=start), b"app", 0, 0)], start)
    answer_batches(pipe, producer, only="m1")  # m2 never answers
    pipe.tick(start + 51_000)
    (pred,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert pred["models"] == ["m1@1"] and not pred["default"]
    by_model = {a["model"]: a for a in pred["answers"]}
    assert by_model["m2"]["label"] is None and "deadline" in by_model["m2"]["error"]
    assert by_model["m2"]["prob"] == pytest.approx(0.5)
    assert pipe.recall("q").labels == {"m1": "1", "m2": None}


def test_a_busy_model_is_not_sent_rows_that_cannot_come_back_in_time(setup) -> None:
    pipe, producer, _ = setup
    pipe.round_trip_us["m1"] = 50_000  # a batch takes 50 ms there and back
    pipe.inflight["m1"] = 1  # and the model is busy
    start = now_us()
    pipe.on_queries(
        [
            RawQuery(query("soon", [1.0, 2.0, 3.0], deadline_ms=10), b"app", 0, 0),
            RawQuery(query("later", [1.0, 2.0, 3.0], deadline_ms=60_000), b"app", 0, 1),
        ],
        start,
    )
    pipe.tick(start + 5_000)  # the batch window ran out
    sent = producer.on(topics.model_requests("m1"), "ModelBatch")
    assert [b["query_ids"] for b in sent] == [["later"]]
    assert pipe.counts["hopeless_rows"] == 1
    pipe.tick(start + 20_000)  # "soon" still gets its one prediction: the default
    (soon,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert soon["query_id"] == "soon" and soon["default"]
