"""Predictions are keyed by their query id (so a reader waiting for some ids skips the
rest undecoded), and a worker restoring its answer memory from them still files each answer
under the selection key intake used, also for personalised apps."""

from __future__ import annotations

import numpy as np

from streams import codec, topics
from streams.config import Settings
from streams.dedup import remembered_for
from streams.pipeline import DictStateStore, Pipeline, RawQuery
from tests.unit.test_pipeline import RecordingProducer, answer_batches, make_registry


def query(qid: str, app: str = "app", user: str | None = None) -> bytes:
    return codec.encode(
        "Query",
        {
            "query_id": qid,
            "app": app,
            "user": user,
            "features": [1.0, 2.0, 3.0],
            "raw": None,
            "text": None,
            "sent_at_us": 1,
            "deadline_ms": None,
        },
    )


def pipeline(personalised: bool) -> tuple[Pipeline, RecordingProducer]:
    registry = make_registry("EXP4", ("m1", "m2"))
    registry.apps["app"]["personalised"] = personalised
    producer = RecordingProducer()
    pipe = Pipeline(
        Settings(bootstrap="unused:1"),
        registry,
        producer,
        DictStateStore(),
        rng=np.random.default_rng(0),
    )
    return pipe, producer


def predictions(producer: RecordingProducer) -> list[tuple[bytes | None, dict]]:
    return [
        (key, codec.decode("Prediction", value))
        for topic, value, key, _ in producer.sent
        if topic == topics.PREDICTIONS
    ]


def test_answers_and_error_predictions_are_keyed_by_query_id() -> None:
    pipe, producer = pipeline(personalised=True)
    pipe.on_queries(
        [
            RawQuery(query("q-1", user="alice"), b"app|alice", 0, 0),
            RawQuery(query("q-2", app="no-such-app"), b"no-such-app", 1, 0),
        ]
    )
    answer_batches(pipe, producer)
    by_key = dict(predictions(producer))
    assert set(by_key) == {b"q-1", b"q-2"}
    assert by_key[b"q-1"]["query_id"] == "q-1" and by_key[b"q-1"]["error"] is None
    assert by_key[b"q-2"]["query_id"] == "q-2" and "unknown app" in by_key[b"q-2"]["error"]


def test_restored_memory_has_the_selection_key_intake_used() -> None:
    for personalised, expected in ((True, "app|alice"), (False, "app")):
        pipe, producer = pipeline(personalised)
        pipe.on_queries([RawQuery(query("q", user="alice"), b"app|alice", 0, 0)])
        answer_batches(pipe, producer)
        ((_, record),) = predictions(producer)
        live = pipe.recall("q")
        restored = remembered_for(record, pipe.registry)
        assert live is not None and restored is not None
        assert restored.key == live.key == expected
        assert (restored.labels, restored.probs) == (live.labels, live.probs)
