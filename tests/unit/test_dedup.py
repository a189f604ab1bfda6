"""De-duplication across workers without Kafka: what a prediction record restores, and how
the pipeline treats restored, redelivered and let-go queries (streams/dedup.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from streams import codec, topics
from streams.config import Settings
from streams.dedup import _plan, remembered_from
from streams.pipeline import DictStateStore, Pipeline, RawQuery
from tests.unit.test_pipeline import RecordingProducer, answer_batches, make_registry, query


def pipeline(models: tuple[str, ...] = ("m1",), policy: str = "SINGLE") -> Pipeline:
    return Pipeline(
        Settings(bootstrap="unused:1"),
        make_registry(policy, models),
        RecordingProducer(),
        DictStateStore(),
        rng=np.random.default_rng(0),
    )


def answered(pipe: Pipeline, qid: str, partition: int) -> dict:
    producer = pipe.producer
    assert isinstance(producer, RecordingProducer)
    pipe.on_queries([RawQuery(query(qid, [1.0, 2.0, 3.0]), b"app", partition, 0)])
    answer_batches(pipe, producer)
    (record,) = [
        (value, kw) for topic, value, _, kw in producer.sent if topic == topics.PREDICTIONS
    ]
    return {"record": codec.decode("Prediction", record[0]), "kw": record[1]}


def test_prediction_goes_to_its_query_partition() -> None:
    pipe = pipeline()
    assert answered(pipe, "q", 3)["kw"]["partition"] == 3
    # an error prediction too (unknown app), since the query id is known
    pipe.on_queries(
        [
            RawQuery(
                codec.encode(
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
                ),
                b"nope",
                2,
                5,
            )
        ]
    )
    producer = pipe.producer
    assert isinstance(producer, RecordingProducer)
    errors = [kw for t, _, _, kw in producer.sent if t == topics.PREDICTIONS][1:]
    assert [kw["partition"] for kw in errors] == [2]


def test_restored_memory_equals_what_the_first_worker_remembered() -> None:
    first = pipeline(("m1", "m2"), "EXP4")
    record = answered(first, "q", 1)["record"]
    restored = remembered_from(record, "app")
    live = first.recall("q")
    assert restored is not None and live is not None
    assert restored.labels == live.labels and restored.probs == live.probs
    assert restored.key == live.key and restored.at_us == live.at_us


def test_error_predictions_restore_no_memory() -> None:
    record = {"answers": [], "app": "a", "emitted_at_us": 5, "worker_us": 0}
    assert remembered_from(record, "a") is None


def test_a_restored_query_is_acked_not_answered_again() -> None:
    pipe = pipeline()
    record = answered(pipeline(), "q", 0)["record"]  # answered by another worker
    pipe.restore("q", remembered_from(record, "app"))
    acked: list[int] = []
    pipe.on_queries([RawQuery(query("q", [1.0, 2.0, 3.0]), b"app", 0, 7, lambda: acked.append(7))])
    producer = pipe.producer
    assert isinstance(producer, RecordingProducer)
    assert acked == [7]
    assert not [s for s in producer.sent if s[0] != topics.DEADLETTER]
    assert pipe.counts["duplicates"] == 1
    assert pipe.recall("q") is not None  # its feedback can still be applied


def test_dropped_partitions_are_forgotten_unacked_and_answered_when_read_again() -> None:
    pipe = pipeline()
    producer = pipe.producer
    assert isinstance(producer, RecordingProducer)
    acked: list[str] = []
    pipe.on_queries(
        [
            RawQuery(query("a", [1.0, 2.0, 3.0]), b"app", 0, 0, lambda: acked.append("a")),
            RawQuery(query("b", [1.0, 2.0, 4.0]), b"app", 1, 0, lambda: acked.append("b")),
        ]
    )
    assert pipe.drop_partitions({0}) == 1
    while answer_batches(pipe, producer):  # the dropped query's answer comes late: ignored
        pass
    pipe.tick()
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["b"]
    assert acked == ["b"]
    # the partition's next owner (here: the same pipeline again) reads it and answers it
    pipe.on_queries(
        [RawQuery(query("a", [1.0, 2.0, 3.0]), b"app", 0, 0, lambda: acked.append("a"))]
    )
    while answer_batches(pipe, producer):
        pass
    pipe.tick()
    assert sorted(p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")) == [
        "a",
        "b",
    ]
    assert sorted(acked) == ["a", "b"]


class FakeMessage:
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
        self.queue: list[FakeMessage] = []

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
            FakeMessage(tp.partition, tp.offset, self.logs[tp.topic][tp.partition][tp.offset])
            for tp in tps
        ]

    def unassign(self) -> None:
        self.queue = []

    def poll(self, timeout: float = 0) -> FakeMessage | None:
        return self.queue.pop(0) if self.queue else None

    def consume(self, n: int, timeout: float = 0) -> list[FakeMessage]:
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
    # query 95 was sent at now-5 s: predictions from now-65 s (offset 35) may answer it
    assert plan.recent == {0: (35, 98)}
    # the answer memory goes back 30 s only, so nothing older is needed for partition 0;
    # partition 1 has nothing to redeliver, and its memory window holds its one prediction
    assert plan.older == {1: (0, 1)}


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
