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


# -- for the command line: what a replay will read, and the states workers hold now ---------

#: the worker's selection table changelog (Faust app ``clipstream``, table ``selection``):
#: compacted, key the selection key, value the JSON of ``SelectionState.to_state()``
SELECTION_CHANGELOG = "clipstream-selection-changelog"


class FeedbackFileError(ValueError):
    """A file of feedback records that replay cannot read."""


def check_feedback_file(path: Path) -> int:
    """Check a JSON-lines file of feedback records before replaying it; returns how many
    records it holds. Raises FeedbackFileError naming the first bad line."""
    count = 0
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeedbackFileError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise FeedbackFileError(f"{where}: expected a JSON object")
            for key in ("query_id", "app"):
                if not isinstance(record.get(key), str):
                    raise FeedbackFileError(f'{where}: "{key}" must be a string')
            label, reward = record.get("label"), record.get("reward")
            if label is not None and not isinstance(label, str):
                raise FeedbackFileError(
                    f'{where}: "label" must be a string as the models answer it, e.g. "0"'
                )
            if reward is not None and (
                isinstance(reward, bool) or not isinstance(reward, int | float)
            ):
                raise FeedbackFileError(f'{where}: "reward" must be a number in [0, 1]')
            count += 1
    return count


def feedback_to_read(
    settings: Settings, from_offset: int | None = None, from_time_ms: int | None = None
) -> int:
    """How many records of the feedback topic a replay from these bounds reads (snapshots
    of earlier replays included): the total of its progress bar."""
    consumer = Consumer(settings.kafka(**{"group.id": f"replay-{uuid.uuid4().hex}"}))
    try:
        parts = sorted(
            consumer.list_topics(topics.FEEDBACK, timeout=30).topics[topics.FEEDBACK].partitions
        )
        starts: dict[int, int] = {}
        if from_time_ms is not None:
            found = consumer.offsets_for_times(
                [TopicPartition(topics.FEEDBACK, p, from_time_ms) for p in parts], timeout=30
            )
            starts = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        total = 0
        for p in parts:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topics.FEEDBACK, p), timeout=30
            )
            if from_time_ms is not None:
                first = starts.get(p, high)
            else:
                first = from_offset if from_offset is not None else low
            total += high - max(low, min(first, high))
        return total
    finally:
        consumer.close()


def live_states(settings: Settings, app: str) -> dict[str, SelectionState]:
    """The selection states of ``app`` (keys ``app`` and ``app|user``) that workers hold now:
    the selection table's changelog read to its end, the latest record per key."""
    latest: dict[str, bytes | None] = {}
    consumer = Consumer(
        settings.kafka(
            **{"group.id": f"clipstream-replay-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
    )
    try:
        md = consumer.list_topics(SELECTION_CHANGELOG, timeout=30).topics.get(SELECTION_CHANGELOG)
        if md is None or md.error is not None:
            return {}  # no worker has run yet: nothing is live
        ends: dict[int, int] = {}
        assignment = []
        for p in sorted(md.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(SELECTION_CHANGELOG, p), timeout=30
            )
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(SELECTION_CHANGELOG, p, low))
        consumer.assign(assignment)
        deadline = time.monotonic() + 120
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{SELECTION_CHANGELOG} not read to its end within 120 s")
            for msg in consume_ready(consumer, 1000, 0.5):
                if msg.error() or msg.partition() not in ends:
                    continue
                latest[_table_key(msg.key())] = msg.value()
                if msg.offset() + 1 >= ends[msg.partition()]:
                    del ends[msg.partition()]
    finally:
        consumer.close()
    return {
        key: SelectionState.from_state(json.loads(value))
        for key, value in sorted(latest.items())
        if value is not None and (key == app or key.startswith(f"{app}|"))
    }


def _table_key(raw: bytes | None) -> str:
    # Faust serialises the table's str keys as JSON strings
    text = (raw or b"").decode("utf-8", errors="replace")
    try:
        key = json.loads(text)
    except ValueError:
        return text
    return key if isinstance(key, str) else text
