"""De-duplication across workers without Kafka: what a prediction record restores, and how
the pipeline treats restored, redelivered and let-go queries (streams/worker/dedup.py)."""

from __future__ import annotations

from typing import Any

from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.worker.dedup import _plan, key_function, remembered_from
from clipstream.streams.worker.pipeline import Pipeline
from tests.unit import fakes
from tests.unit.fakes import answer_batches, make_pipeline, make_registry, query


def answered(pipe: Pipeline, producer, qid: str, partition: int) -> dict:
    pipe.on_queries([query(qid, partition=partition, deadline_ms=60_000)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    (value,) = [v for t, v, _, _ in producer.sent if t == topics.PREDICTIONS]
    return codec.decode("Prediction", value)


def test_an_error_prediction_goes_to_its_query_partition_too() -> None:
    pipe, producer = make_pipeline()
    value = codec.encode(
        "Query",
        {
            "query_id": "bad",
            "app": "nope",
            "user": None,
            "features": [1.0],
            "raw": None,
            "text": None,
            "sent_at_us": 1,
            "deadline_ms": None,
        },
    )
    pipe.on_queries([fakes.FakeMessage(topics.QUERIES, value, b"bad", 2, 5)], now_us())
    assert [kw["partition"] for kw in producer.where(topics.PREDICTIONS)] == [2]


def test_restored_memory_equals_what_the_first_worker_remembered() -> None:
    registry = make_registry("EXP4", ("m1", "m2"), personalised=True)
    first, producer = make_pipeline(registry)
    first.on_queries([query("q", user="ann", deadline_ms=60_000)], now_us())
    first.tick(now_us())
    answer_batches(first, producer)
    (value,) = [v for t, v, _, _ in producer.sent if t == topics.PREDICTIONS]
    record = codec.decode("Prediction", value)
    restored = remembered_from(record, key_function(registry)(record))
    live = first.memory.recall("q", now_us())
    assert restored is not None and live is not None
    assert restored.labels == live.labels and restored.probs == live.probs
    assert restored.key == live.key == "app|ann" and restored.at_us == live.at_us


def test_error_predictions_restore_no_memory() -> None:
    record = {"answers": [], "app": "a", "emitted_at_us": 5, "worker_us": 0}
    assert remembered_from(record, "a") is None


def test_a_restored_query_is_done_not_answered_again() -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    other, other_producer = make_pipeline(registry)
    record = answered(other, other_producer, "q", 0)  # answered by another worker
    pipe, producer = make_pipeline(registry)
    pipe.restore([("q", record["emitted_at_us"], remembered_from(record, "app"))])
    pipe.on_queries([query("q", offset=7)], now_us())
    assert not producer.sent
    assert pipe.counts["duplicates"] == 1
    assert pipe.offsets.to_commit() == {(topics.QUERIES, 0): 8}
    assert pipe.memory.recall("q", now_us()) is not None  # its feedback can still be applied


def test_dropped_partitions_are_forgotten_uncommitted_and_answered_when_read_again() -> None:
    pipe, producer = make_pipeline()
    now = now_us()
    pipe.on_queries(
        [query("a", partition=0, deadline_ms=60_000), query("b", [1.0, 2.0, 4.0], partition=1)],
        now,
    )
    pipe.tick(now)
    assert pipe.drop({0}) == 1
    while answer_batches(pipe, producer):  # the dropped query's answer comes late: ignored
        pipe.tick(now_us())
    producer.poll()
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["b"]
    assert {tp: o for tp, o in pipe.offsets.to_commit().items() if tp[0] == topics.QUERIES} == {
        (topics.QUERIES, 1): 1
    }
    # the partition's next owner (here: the same pipeline again) reads it and answers it
    pipe.on_queries([query("a", partition=0, deadline_ms=60_000)], now_us())
    pipe.tick(now_us())
    while answer_batches(pipe, producer):
        pipe.tick(now_us())
    assert sorted(p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")) == [
        "a",
        "b",
    ]


class StampedMessage:
    def __init__(self, partition: int, offset: int, timestamp_ms: int) -> None:
        self._p, self._o, self._t = partition, offset, timestamp_ms

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, int]:
        return (1, self._t)


class FakeConsumer:
    """The consumer calls ``dedup._plan`` makes, over in-memory logs: topic -> partition ->
    message timestamps (ms) by offset, and the group's committed query offsets."""

    def __init__(self, logs: dict[str, dict[int, list[int]]], committed: dict[int, int]) -> None:
        self.logs, self.committed_offsets = logs, committed
        self.queue: list[StampedMessage] = []

    def committed(self, tps: list, timeout: float = 0) -> list:
        from confluent_kafka import TopicPartition

        return [
            TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, -1001))
            for tp in tps
        ]

    def get_watermark_offsets(self, tp: Any, timeout: float = 0) -> tuple[int, int]:
        return 0, len(self.logs[tp.topic][tp.partition])

    def offsets_for_times(self, tps: list, timeout: float = 0) -> list:
        from confluent_kafka import TopicPartition

        if not tps:
            raise ValueError("librdkafka rejects an empty list")
        out = []
        for tp in tps:
            stamps = self.logs[tp.topic][tp.partition]
            at = next((i for i, t in enumerate(stamps) if t >= tp.offset), -1)
            out.append(TopicPartition(tp.topic, tp.partition, at))
        return out

    def assign(self, tps: list) -> None:
        self.queue = [
            StampedMessage(tp.partition, tp.offset, self.logs[tp.topic][tp.partition][tp.offset])
            for tp in tps
        ]

    def unassign(self) -> None:
        self.queue = []

    def poll(self, timeout: float = 0) -> StampedMessage | None:
        return self.queue.pop(0) if self.queue else None

    def consume(self, n: int, timeout: float = 0) -> list[StampedMessage]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return out


def test_plan_reads_back_from_the_first_redelivered_query_less_the_clock_skew() -> None:
    now = 10_000_000
    logs = {
        # partition 0: queries at 1 s intervals up to now; 1: nothing to redeliver
        topics.QUERIES: {0: [now - 100_000 + 1000 * i for i in range(100)], 1: [now - 5000]},
        topics.PREDICTIONS: {0: [now - 100_000 + 1000 * i + 10 for i in range(98)], 1: [now]},
    }
    consumer = FakeConsumer(logs, committed={0: 95, 1: 1})
    settings = Settings(bootstrap="unused:1", answer_ttl_s=30.0, partitions=2)
    plan = _plan(consumer, settings, [0, 1], now)  # type: ignore[arg-type]
    # query 95 was stamped at now-5 s: predictions from now-10 s (offset 90) may answer it
    assert plan.recent == {0: (90, 98)}
    # the answer memory goes back 30 s (offset 70); partition 1 has nothing to redeliver,
    # and its memory window holds its one prediction
    assert plan.older == {0: (70, 90), 1: (0, 1)}


def test_plan_with_a_long_answer_memory_reads_the_rest_in_the_background() -> None:
    now = 10_000_000
    logs = {
        topics.QUERIES: {0: [now - 1000 * (100 - i) for i in range(100)]},
        topics.PREDICTIONS: {0: [now - 1000 * (100 - i) + 10 for i in range(100)]},
    }
    consumer = FakeConsumer(logs, committed={0: 100})  # everything acknowledged
    settings = Settings(bootstrap="unused:1", answer_ttl_s=3600.0, answer_memory=40, partitions=1)
    plan = _plan(consumer, settings, [0], now)  # type: ignore[arg-type]
    assert plan.recent == {}
    assert plan.older == {0: (60, 100)}  # capped by the memory's capacity


def test_a_takeover_with_full_memories_answers_once_and_accepts_feedback() -> None:
    """Issue 31 through the pipeline: this worker's memories are full of its own answers
    when it takes over a partition; the predecessor's answers restored from the log are
    newer, so a redelivered query is not answered twice and its feedback is joined."""
    registry = make_registry("EXP4", ("m1", "m2"))
    other, other_producer = make_pipeline(registry)
    pipe, producer = make_pipeline(registry, dedup_memory=4, answer_memory=4)
    for i in range(6):  # the memories fill up, then evict
        answered(pipe, producer, f"own{i}", 0)
        producer.sent.clear()
    assert len(pipe.emitted) == 4 and len(pipe.memory) == 4
    record = answered(other, other_producer, "taken", 1)  # answered by the predecessor
    assert record["emitted_at_us"] > 0
    pipe.restore([("taken", record["emitted_at_us"], remembered_from(record, "app"))])
    pipe.on_queries([query("taken", partition=1, offset=3)], now_us())
    assert pipe.counts["duplicates"] == 1 and not producer.sent
    pipe.on_feedback([fakes.feedback("taken", partition=1)], now_us())
    (batch,) = producer.on(topics.OBSERVATIONS, "ObservationBatch")
    assert [o["query_id"] for o in batch["observations"]] == ["taken"]
    assert not producer.where(topics.DEADLETTER)
