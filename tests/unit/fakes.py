"""Stand-ins for the Kafka client library (not for the broker: integration tests use the
real one) so the worker's stages can be driven in-process: messages as confluent-kafka
hands them over, a producer that records what it is given and reports deliveries when
polled, and a registry with a few apps."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from clipstream.models.control.registry import Registry
from clipstream.selection import SelectionState
from clipstream.streams.learning.state_view import StateView
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.pipeline import Pipeline

LOG_APPEND_TIME = 2
CREATE_TIME = 1


class FakeMessage:
    """What the pipeline reads of a confluent_kafka.Message."""

    def __init__(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int = 0,
        offset: int = 0,
        timestamp: tuple[int, int] = (CREATE_TIME, 0),
    ) -> None:
        self._topic, self._value, self._key = topic, value, key
        self._partition, self._offset, self._timestamp = partition, offset, timestamp

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def error(self) -> None:
        return None


class FakeError:
    """A delivery error as librdkafka reports one."""

    def __init__(self, code: int, retriable: bool = False) -> None:
        self._code, self._retriable = code, retriable

    def code(self) -> int:
        return self._code

    def retriable(self) -> bool:
        return self._retriable

    def __str__(self) -> str:
        return f"error {self._code}"


class MemoryStore(dict):
    """A selection table in memory for the learner (learning.learner.StateStore): selection
    key bytes -> the state as the changelog would hold it (JSON, decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        #: messages the writes made done, in order
        self.done: list[tuple[int, int]] = []
        #: observations dead-lettered with the writes: (key, value, partition, offset, reason)
        self.rejected: list[tuple[bytes, bytes, int, int, str]] = []

    def stored(self, key: str) -> SelectionState | None:
        value = self.get(key.encode())
        return SelectionState.from_state(value) if value else None

    def write(
        self,
        states: Mapping[str, SelectionState],
        observed: list[tuple[int, int]],
        rejected: list[tuple[bytes, bytes, int, int, str]],
    ) -> None:
        for key, state in states.items():
            self.writes += 1
            self[key.encode()] = json.loads(json.dumps(state.to_state()))
        self.done.extend(observed)
        self.rejected.extend(rejected)


class RecordingProducer:
    """Records every produce; ``poll`` reports them delivered (or failed, for the topics
    ``fail`` names: topic -> the error to report, once per produce while it is set)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, dict[str, Any]]] = []
        self._callbacks: list[tuple[FakeMessage, Callable[..., None]]] = []
        self.fail: dict[str, FakeError] = {}
        #: (topic, partition) -> the next offset there
        self.ends: dict[tuple[str, int], int] = {}

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **kw: Any) -> None:
        self.sent.append((topic, value, key, kw))
        if kw.get("on_delivery"):
            partition = kw.get("partition", 0)
            offset = self.ends.get((topic, partition), 0)
            self.ends[topic, partition] = offset + 1
            message = FakeMessage(topic, value, key, partition, offset)
            self._callbacks.append((message, kw["on_delivery"]))

    def poll(self, timeout: float = 0) -> int:
        n = 0
        while self._callbacks:
            callbacks, self._callbacks = self._callbacks, []
            for message, cb in callbacks:
                cb(self.fail.get(message.topic()), message)
                n += 1
        return n

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def on(self, topic: str, kind: str) -> list[dict[str, Any]]:
        return [codec.decode(kind, v) for t, v, _, _ in self.sent if t == topic]

    def where(self, topic: str) -> list[dict[str, Any]]:
        """The keyword arguments (partition, ...) of each produce to ``topic``."""
        return [kw for t, _, _, kw in self.sent if t == topic]


def model_spec(input_dim: int | None = 3) -> dict[str, Any]:
    return {
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
                "input_dim": input_dim,
                "nan_policy": "reject",
                "deployed_at_us": 0,
            }
        ],
    }


def make_registry(
    policy: str = "SINGLE", models: tuple[str, ...] = ("m1",), personalised: bool = False
) -> Registry:
    reg = Registry()
    for name in models:
        reg.apply(
            {"kind": "MODEL", "name": name, "deleted": False, "app": None, "model": model_spec()}
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
                "personalised": personalised,
                "input_dim": 3,
                "eta": 0.1,
                "gamma": 0.05,
                "cache": True,
            },
        }
    )
    return reg


def make_pipeline(
    registry: Registry | None = None, sensor: Sensor | None = None, **settings: Any
) -> tuple[Pipeline, RecordingProducer]:
    producer = RecordingProducer()
    pipe = Pipeline(
        Settings(bootstrap="unused:1", **settings),
        registry or make_registry(),
        producer,
        StateView(),
        sensor=sensor,
        rng=np.random.default_rng(0),
    )
    return pipe, producer


def query_value(
    qid: str,
    features: list[float],
    sent: int | None = None,
    deadline_ms: float | None = None,
    app: str = "app",
    user: str | None = None,
) -> bytes:
    return codec.encode(
        "Query",
        {
            "query_id": qid,
            "app": app,
            "user": user,
            "features": features,
            "raw": None,
            "text": None,
            "sent_at_us": sent or now_us(),
            "deadline_ms": deadline_ms,
        },
    )


def query(
    qid: str,
    features: list[float] | None = None,
    *,
    partition: int = 0,
    offset: int = 0,
    **kw: Any,
) -> FakeMessage:
    value = query_value(qid, features if features is not None else [1.0, 2.0, 3.0], **kw)
    return FakeMessage(topics.QUERIES, value, qid.encode(), partition, offset)


def feedback(
    qid: str,
    *,
    label: str | None = "1",
    reward: float | None = None,
    app: str = "app",
    partition: int = 0,
    offset: int = 0,
) -> FakeMessage:
    value = codec.encode(
        "Feedback",
        {
            "query_id": qid,
            "app": app,
            "user": None,
            "label": label,
            "reward": reward,
            "sent_at_us": now_us(),
        },
    )
    return FakeMessage(topics.FEEDBACK, value, qid.encode(), partition, offset)


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


def take_batches(producer: RecordingProducer, only: str | None = None) -> list[dict]:
    """The batches sent so far (to model ``only``, if given), taken off the producer."""

    def wanted(sent: tuple) -> bool:
        topic = sent[0]
        return topic.endswith(".requests") and (
            only is None or topic == topics.model_requests(only)
        )

    requests = [s for s in producer.sent if wanted(s)]
    producer.sent = [s for s in producer.sent if not wanted(s)]
    return [codec.decode("ModelBatch", value) for _, value, _, _ in requests]


def answer_batches(
    pipe: Pipeline, producer: RecordingProducer, label: str = "1", only: str | None = None
) -> int:
    """Play a replica: answer the batches sent so far (to model ``only``, if given)."""
    batches = take_batches(producer, only)
    for i, batch in enumerate(batches):
        result = codec.encode("ModelBatchResult", result_for(batch, label))
        message = FakeMessage(topics.RESPONSES, result, None, batch["reply_partition"], i)
        pipe.on_results([message], now_us())
    return len(batches)


def observation(qid: str, labels: dict[str, str | None], truth: str, fb_offset: int, **kw) -> dict:
    return {
        "key": kw.get("key", "app"),
        "app": "app",
        "query_id": qid,
        "user": kw.get("user"),
        "answers": [{"model": m, "label": lab, "prob": 0.5} for m, lab in labels.items()],
        "label": truth,
        "reward": None,
        "feedback_partition": kw.get("fb_partition", 0),
        "feedback_offset": fb_offset,
        "at_us": 0,
    }


def records(observations: list[dict], start: int = 0, partition: int = 1) -> list:
    """Messages of clipstream.observations as release 0.1.0 wrote them: one observation
    each, keyed by its selection key."""
    return [
        (o["key"].encode(), codec.encode("Observation", o), partition, start + i)
        for i, o in enumerate(observations)
    ]


def batches(observations: list[dict], per: int, start: int = 0, partition: int = 1) -> list:
    """Messages of clipstream.observations as workers write them: ``per`` observations each."""
    return [
        (
            None,
            codec.encode("ObservationBatch", {"observations": observations[i : i + per]}),
            partition,
            start + n,
        )
        for n, i in enumerate(range(0, len(observations), per))
    ]
