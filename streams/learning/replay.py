"""``clipstream replay``: rebuild selection state from the log it was learnt from.

Every feedback record the workers accepted is on clipstream.observations, joined with the
answers of its query, on its selection key's partition, in the order the key's one writer
applied it (learning.learner). Replay folds that log again from scratch with the same
``fold`` and writes one ``SelectionSnapshot`` per selection key to the same topic; the
worker owning the key installs it and re-applies what arrived after the replay read. So
a replay of everything from the beginning reproduces the live state bit for bit, and
replaying twice installs the same state as replaying once.

A file of feedback records (JSON lines) is replayed against the answers on the
predictions topic, in the file's order.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from clipstream.models.control.registry import Registry, current
from clipstream.selection import SelectionState, selection_key
from clipstream.streams.learning.learner import fold, observations_of_message
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import partition_watermarks, read_ranges
from clipstream.streams.worker.merge import model_answers


@dataclass
class Observed:
    """One observation in log order: where it was, and the record."""

    partition: int
    offset: int
    record: dict[str, Any]


@dataclass
class Read:
    """What a read of a topic covered: per partition, the last offset read."""

    last: dict[int, int] = field(default_factory=dict)


def read_topic(
    settings: Settings,
    topic: str,
    start: Callable[[int, int, int], int],
    on_progress: Callable[[int], None] | None = None,
    covered: Read | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, int, bytes | None, bytes | None]]:
    """(partition, offset, key, value) from ``start(partition, low, high)`` up to the end
    the topic had when the read began."""
    consumer = Consumer(
        settings.kafka(
            **{"group.id": f"clipstream-replay-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
    )
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ranges: dict[int, tuple[int, int]] = {}
        for p, (low, high) in partition_watermarks(consumer, topic, sorted(parts), 30).items():
            ranges[p] = (max(low, min(start(p, low, high), high)), high)
            if covered is not None and high > 0:
                covered.last[p] = high - 1
        if on_total is not None:
            on_total(sum(end - first for first, end in ranges.values()))
        for msg in read_ranges(consumer, topic, ranges, 600):
            yield msg.partition(), msg.offset(), msg.key(), msg.value()
            if on_progress is not None:
                on_progress(1)
    finally:
        consumer.close()


def observations_from_topic(
    settings: Settings,
    app: str,
    from_offset: int | None = None,
    from_time_ms: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    covered: Read | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Iterator[Observed]:
    """``app``'s observations, from the beginning, a time, or the feedback at or after an
    offset of every feedback partition (what the app produced: each observation names the
    feedback it joins; how many observations a message holds depends on the batches the
    workers happened to read)."""
    starts: dict[int, int] = {}
    if from_time_ms is not None:
        consumer = Consumer(settings.kafka(**{"group.id": f"replay-{uuid.uuid4().hex}"}))
        parts = consumer.list_topics(topics.OBSERVATIONS, timeout=30).topics[topics.OBSERVATIONS]
        found = consumer.offsets_for_times(
            [TopicPartition(topics.OBSERVATIONS, p, from_time_ms) for p in parts.partitions],
            timeout=30,
        )
        starts = {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        consumer.close()

    def start(partition: int, low: int, high: int) -> int:
        return starts.get(partition, high) if from_time_ms is not None else low

    for partition, offset, key, value in read_topic(
        settings, topics.OBSERVATIONS, start, on_progress, covered, on_total
    ):
        for observed in observations_of(app, partition, offset, key, value):
            if from_offset is None or observed.record["feedback_offset"] >= from_offset:
                yield observed


def observations_of(
    app: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> Iterator[Observed]:
    """``app``'s observations in one message of clipstream.observations, in log order: a
    batch's, or the one a message of an older release holds."""
    text = key.decode("utf-8", "replace") if key is not None else None
    for record in observations_of_message(text, value):
        if record["app"] == app:
            yield Observed(partition, offset, record)


def observations_from_file(settings: Settings, app: str, path: Path) -> Iterator[Observed]:
    """JSON lines of feedback ({"query_id", "app", "label"?, "reward"?} per line), joined
    with the answers the predictions topic holds for their queries, in the file's order."""
    answers: dict[str, dict[str, Any]] = {}
    for _, _, _, value in read_topic(settings, topics.PREDICTIONS, lambda p, low, high: low):
        try:
            prediction = codec.decode("Prediction", value)
        except codec.DecodeError:
            continue
        if prediction["app"] == app and prediction["answers"]:
            answers[prediction["query_id"]] = prediction
    with path.open() as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            fb = json.loads(line)
            if fb.get("app", app) != app or fb.get("query_id") not in answers:
                continue
            prediction = answers[fb["query_id"]]
            labels, probs = model_answers(prediction)
            yield Observed(
                -1,
                number,
                {
                    "key": app,
                    "app": app,
                    "query_id": fb["query_id"],
                    "user": prediction["user"],
                    "answers": [{"model": m, "label": labels[m], "prob": probs[m]} for m in labels],
                    "label": None if fb.get("label") is None else str(fb["label"]),
                    "reward": fb.get("reward"),
                    "feedback_partition": -1,
                    "feedback_offset": number,
                    "at_us": 0,
                },
            )


def rebuild(
    registry: Registry, into: str, observations: Iterable[Observed]
) -> tuple[dict[str, SelectionState], dict[str, int]]:
    """Selection states of app ``into`` folded from ``observations`` (in log order)."""
    spec = registry.app(into)
    if spec is None:
        raise ValueError(f"unknown app {into!r}: register it first")
    states: dict[str, SelectionState] = {}
    counts = {"applied": 0, "replayed": 0, "no_signal": 0}
    for item in observations:
        obs = item.record
        if obs["label"] is None and obs["reward"] is None:
            counts["no_signal"] += 1
            continue
        key = selection_key(into, obs["user"] if spec["personalised"] else None)
        state = states.get(key)
        state = states[key] = SelectionState.following(state, spec)
        if fold(state, obs):
            counts["applied"] += 1
        else:
            counts["replayed"] += 1
    return states, counts


def publish(
    settings: Settings,
    states: dict[str, SelectionState],
    app: str,
    source: str,
    covered: Read | None = None,
) -> None:
    producer = Producer(
        settings.kafka(**{"enable.idempotence": True, "partitioner": "murmur2_random"})
    )
    parts = producer.list_topics(topics.OBSERVATIONS, timeout=30).topics[topics.OBSERVATIONS]
    count = len(parts.partitions)
    for key, state in states.items():
        partition = topics.partition_for(key, count)
        observed = covered.last.get(partition, -1) if covered is not None else -1
        producer.produce(
            topics.OBSERVATIONS,
            codec.encode(
                "SelectionSnapshot",
                {
                    "key": key,
                    "app": app,
                    "state": state.to_bytes().decode(),
                    "source": source,
                    "at_us": time.time_ns() // 1000,
                    "observed_offset": observed,
                },
            ),
            key.encode(),
            partition=partition,
        )
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
    on_total: Callable[[int], None] | None = None,
) -> tuple[dict[str, SelectionState], dict[str, int]]:
    into = into or app
    registry = current(settings)
    covered = Read()
    if file is not None:
        observations: Iterable[Observed] = observations_from_file(settings, app, file)
        source = f"file {file}"
    else:
        observations = observations_from_topic(
            settings, app, from_offset, from_time_ms, on_progress, covered, on_total
        )
        source = f"{topics.OBSERVATIONS} of {app}"
    states, counts = rebuild(registry, into, observations)
    if not dry_run:
        publish(settings, states, into, source, covered)
    return states, counts


# -- for the command line: checking a file before a replay, and the states workers hold now -


class FeedbackFileError(ValueError):
    """A file of feedback records that replay cannot read."""


def check_feedback_file(path: Path) -> int:
    """Check a JSON-lines file of feedback records before replaying it (observations_from_file
    would stop at the first bad line with a bare JSON error); returns how many records it
    holds. Raises FeedbackFileError naming the first bad line."""
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
            if not isinstance(record.get("query_id"), str):
                raise FeedbackFileError(f'{where}: "query_id" must be a string')
            if not isinstance(record.get("app", ""), str):
                raise FeedbackFileError(f'{where}: "app" must be a string')
            label, reward = record.get("label"), record.get("reward")
            if isinstance(label, bool) or not isinstance(label, str | int | float | None):
                raise FeedbackFileError(f'{where}: "label" must be a string or a number')
            if reward is not None and (
                isinstance(reward, bool) or not isinstance(reward, int | float)
            ):
                raise FeedbackFileError(f'{where}: "reward" must be a number in [0, 1]')
            count += 1
    return count


class _Latest(dict[str, bytes]):
    """The latest serialised state per key, as the learning feed hands changelog records over."""

    def apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.pop(key, None)
        else:
            self[key] = value


def live_states(settings: Settings, app: str) -> dict[str, SelectionState]:
    """The selection states of ``app`` (keys ``app`` and ``app|user``) that workers hold now:
    the selection table's changelog read to its end."""
    from clipstream.streams.learning.feed import LearningFeed

    latest = _Latest()
    feed = LearningFeed(settings, latest)
    try:
        feed.catch_up()
    finally:
        feed.close()
    return {
        key: SelectionState.from_bytes(value)
        for key, value in sorted(latest.items())
        if key == app or key.startswith(f"{app}|")
    }
