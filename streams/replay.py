"""``clipstream replay``: rebuild selection state from the feedback log.

Each prediction carries every consulted model's answer and the probability or weight the
policy gave it, so the predictions topic and the feedback topic (or a file of feedback
records) together determine the selection state. Replay recomputes it from scratch, in
each partition's offset order as the worker applies it, and writes one
``SelectionSnapshot`` per selection key to the feedback topic; the worker owning the key
installs it in its table. Recomputing from scratch is what makes replay idempotent:
replaying twice installs the same state as replaying once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from models.registry import Registry, current
from selection import SelectionState
from streams import codec, topics
from streams.config import Settings
from streams.kafka_util import consume_ready
from streams.pipeline import model_answers, new_state, selection_key


@dataclass
class Answers:
    key_user: str | None
    labels: dict[str, str | None]
    probs: dict[str, float]


@dataclass
class FeedbackItem:
    partition: int
    offset: int
    record: dict[str, Any]


def read_topic(
    settings: Settings,
    topic: str,
    start: Callable[[int, int, int], int],
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, int, bytes | None]]:
    """(partition, offset, value) from ``start(partition, low, high)`` up to the end the
    topic had when the read began."""
    consumer = Consumer(
        settings.kafka(
            **{"group.id": f"clipstream-replay-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
    )
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends: dict[int, int] = {}
        assignment = []
        for p in sorted(parts):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            first = max(low, min(start(p, low, high), high))
            if first < high:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, first))
        if not assignment:
            return
        consumer.assign(assignment)
        deadline = time.monotonic() + 600
        while ends and time.monotonic() < deadline:
            for msg in consume_ready(consumer, 1000, 0.5):
                if msg.error() or msg.partition() not in ends:
                    continue
                yield msg.partition(), msg.offset(), msg.value()
                if on_progress is not None:
                    on_progress(1)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    del ends[msg.partition()]
    finally:
        consumer.close()


def collect_answers(settings: Settings, app: str) -> dict[str, Answers]:
    """Query id -> what each model answered, from the predictions topic."""
    found: dict[str, Answers] = {}
    for _, _, value in read_topic(settings, topics.PREDICTIONS, lambda p, low, high: low):
        try:
            record = codec.decode("Prediction", value)
        except codec.DecodeError:
            continue
        if record["app"] != app or not record["answers"]:
            continue
        labels, probs = model_answers(record)
        found[record["query_id"]] = Answers(key_user=record["user"], labels=labels, probs=probs)
    return found


def feedback_from_topic(
    settings: Settings,
    from_offset: int | None = None,
    from_time_ms: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[FeedbackItem]:
    starts: dict[int, int] = {}
    if from_time_ms is not None:
        consumer = Consumer(settings.kafka(**{"group.id": f"replay-{uuid.uuid4().hex}"}))
        parts = consumer.list_topics(topics.FEEDBACK, timeout=30).topics[topics.FEEDBACK]
        found = consumer.offsets_for_times(
            [TopicPartition(topics.FEEDBACK, p, from_time_ms) for p in parts.partitions],
            timeout=30,
        )
        starts = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        consumer.close()

    def start(partition: int, low: int, high: int) -> int:
        if from_time_ms is not None:
            return starts.get(partition, high)
        return from_offset if from_offset is not None else low

    for partition, offset, value in read_topic(settings, topics.FEEDBACK, start, on_progress):
        if codec.kind_of(value, ("Feedback",)) is None:
            continue  # snapshots from earlier replays, or bytes that are not feedback
        yield FeedbackItem(partition, offset, codec.decode("Feedback", value))


def feedback_from_file(path: Path) -> Iterator[FeedbackItem]:
    """JSON lines: {"query_id", "app", "user"?, "label"?, "reward"?} per line."""
    with path.open() as lines:
        for number, line in enumerate(lines):
            if line.strip():
                record = json.loads(line)
                record.setdefault("user", None)
                record.setdefault("label", None)
                record.setdefault("reward", None)
                yield FeedbackItem(-1, number, record)


def rebuild(
    registry: Registry,
    app: str,
    into: str,
    answers: dict[str, Answers],
    feedback: Iterable[FeedbackItem],
) -> tuple[dict[str, SelectionState], dict[str, int]]:
    """Selection states of ``into``, learnt from ``app``'s feedback, and counts."""
    spec = registry.app(into)
    if spec is None:
        raise ValueError(f"unknown app {into!r}: register it first")
    states: dict[str, SelectionState] = {}
    counts = {"applied": 0, "unknown_query": 0, "other_app": 0, "no_signal": 0}
    ordered = sorted(feedback, key=lambda f: (f.partition, f.offset))
    for item in ordered:
        fb = item.record
        if fb["app"] != app:
            counts["other_app"] += 1
            continue
        seen = answers.get(fb["query_id"])
        if seen is None:
            counts["unknown_query"] += 1
            continue
        if fb["label"] is None and fb["reward"] is None:
            counts["no_signal"] += 1
            continue
        key = selection_key(into, seen.key_user if spec["personalised"] else None)
        state = states.get(key)
        if state is None:
            state = states[key] = new_state(spec)
        state.learn(seen.labels, fb["label"], seen.probs, reward=fb["reward"])
        if item.partition >= 0:
            state.mark_applied(item.partition, item.offset)
        counts["applied"] += 1
    return states, counts


def publish(settings: Settings, states: dict[str, SelectionState], app: str, source: str) -> None:
    producer = Producer(
        settings.kafka(**{"enable.idempotence": True, "partitioner": "murmur2_random"})
    )
    for key, state in states.items():
        record = {
            "key": key,
            "app": app,
            "state": json.dumps(state.to_state()),
            "source": source,
            "at_us": time.time_ns() // 1000,
        }
        producer.produce(topics.FEEDBACK, codec.encode("SelectionSnapshot", record), key.encode())
    if producer.flush(30) != 0:
        raise TimeoutError("snapshots not delivered within 30 s")


def replay(
    settings: Settings,
    app: str,
    *,
    into: str | None = None,
    from_offset: int | None = None,
    from_time_ms: int | None = None,
    file: Path | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, SelectionState], dict[str, int]]:
    into = into or app
    registry = current(settings)
    answers = collect_answers(settings, app)
    if file is not None:
        feedback: Iterable[FeedbackItem] = feedback_from_file(file)
        source = f"file {file}"
    else:
        feedback = feedback_from_topic(settings, from_offset, from_time_ms, on_progress)
        source = f"{topics.FEEDBACK} of {app}"
    states, counts = rebuild(registry, app, into, answers, feedback)
    if not dry_run:
        publish(settings, states, into, source)
    return states, counts
