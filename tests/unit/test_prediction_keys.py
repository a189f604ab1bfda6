"""Predictions are keyed by their query id (so a reader waiting for some ids skips the
rest undecoded), and a worker restoring its answer memory from them still files each answer
under the selection key intake used, also for personalised apps."""

from __future__ import annotations

from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.worker.dedup import key_function, remembered_from
from tests.unit.fakes import RecordingProducer, answer_batches, make_pipeline, make_registry, query


def predictions(producer: RecordingProducer) -> list[tuple[bytes | None, dict]]:
    return [
        (key, codec.decode("Prediction", value))
        for topic, value, key, _ in producer.sent
        if topic == topics.PREDICTIONS
    ]


def test_answers_and_error_predictions_are_keyed_by_query_id() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2"), personalised=True))
    pipe.on_queries(
        [
            query("q-1", user="alice", deadline_ms=60_000),
            query("q-2", app="no-such-app", partition=1),
        ],
        now_us(),
    )
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    by_key = dict(predictions(producer))
    assert set(by_key) == {b"q-1", b"q-2"}
    assert by_key[b"q-1"]["query_id"] == "q-1" and by_key[b"q-1"]["error"] is None
    assert by_key[b"q-2"]["query_id"] == "q-2" and "unknown app" in by_key[b"q-2"]["error"]


def test_restored_memory_has_the_selection_key_intake_used() -> None:
    for personalised, expected in ((True, "app|alice"), (False, "app")):
        registry = make_registry("EXP4", ("m1", "m2"), personalised=personalised)
        pipe, producer = make_pipeline(registry)
        pipe.on_queries([query("q", user="alice", deadline_ms=60_000)], now_us())
        pipe.tick(now_us())
        answer_batches(pipe, producer)
        ((_, record),) = predictions(producer)
        live = pipe.memory.recall("q", now_us())
        restored = remembered_from(record, key_function(registry)(record))
        assert live is not None and restored is not None
        assert restored.key == live.key == expected
        assert (restored.labels, restored.probs) == (live.labels, live.probs)
