"""Exactly one prediction per query id across worker crashes, restarts and rebalances.

A query's offset is committed only once its prediction is delivered, so after a crash or a
rebalance the queries past the committed offset are read again by the partition's next
owner, some of them already answered. The mechanism here is idempotent de-duplication
before the predictions topic, not Kafka transactions (the serving loop consumes and
produces with librdkafka: worker.serving):

* a prediction is produced to the partition number of its query (the predictions topic has
  the queries topic's partition count), so what was answered for query partition ``p`` is
  all on predictions partition ``p``;
* when a worker is assigned query partition ``p``, before it serves ``p``, it reads
  predictions partition ``p`` from a point safely before the committed query offset up to
  its end, and marks every query id found there as emitted; a redelivered query whose id
  was emitted is acknowledged without a second prediction;
* the same read restores the answer memory that turns feedback into per-model losses
  (each prediction carries every consulted model's answer and weight), so feedback for
  queries answered before a restart is applied as the first worker would have applied it,
  which is what ``clipstream replay`` recomputes from the same two topics.

"Safely before" is the timestamp of the query at the committed offset, less
``PREDICTION_SKEW_US`` (a prediction is produced after its query was read, so only clock
skew between the broker that stamped the query and the worker that stamped its prediction
can put it earlier), or further back to cover the answer memory's time to live, bounded by
its capacity.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

from clipstream.models.control.registry import Registry
from clipstream.selection import selection_key
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import partition_watermarks, read_ranges
from clipstream.streams.worker.answers import Remembered
from clipstream.streams.worker.merge import model_answers

# Queries are stamped by the broker (LogAppendTime) and predictions by the worker that made
# them: servers' clocks, a few seconds apart at the very most.
PREDICTION_SKEW_US = 5_000_000

log = logging.getLogger("clipstream.dedup")


@dataclass
class Restored:
    """What one restore read: predictions seen, and how long it took."""

    predictions: int = 0
    seconds: float = 0.0


def key_function(registry: Registry) -> Callable[[Mapping[str, Any]], str]:
    """The selection key of a Prediction record, as the worker that made it chose it."""

    def key_of(record: Mapping[str, Any]) -> str:
        app = registry.app(record["app"])
        personalised = bool(app and app["personalised"])
        return selection_key(record["app"], record["user"] if personalised else None)

    return key_of


def remembered_from(record: Mapping[str, Any], key: str) -> Remembered | None:
    """The answer memory entry a prediction stands for (None if it has no model answers,
    as an error prediction: feedback for it is rejected live and skipped by replay)."""
    if not record["answers"]:
        return None
    labels, probs = model_answers(record)
    return Remembered(
        key=key,
        app=record["app"],
        labels=labels,
        probs=probs,
        at_us=record["emitted_at_us"] - record["worker_us"],
    )


@dataclass
class Plan:
    """Offset ranges [start, end) of predictions partitions to read on assignment."""

    #: every prediction a redelivered query can have: read before serving queries
    recent: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: the rest of the answer memory's window: read before applying feedback
    older: dict[int, tuple[int, int]] = field(default_factory=dict)


def plan(settings: Settings, partitions: Iterable[int], group: str) -> Plan:
    """Where to read each predictions partition (see the module docstring)."""
    parts = sorted(set(partitions))
    if not parts:
        return Plan()
    consumer = _consumer(settings, group)
    try:
        return _plan(consumer, settings, parts, time.time_ns() // 1_000_000)
    finally:
        consumer.close()


def _consumer(settings: Settings, group: str) -> Consumer:
    return Consumer(
        settings.kafka(
            **{
                # the worker group's id, only to read its committed offsets: this consumer
                # never subscribes, so it never joins the group
                "group.id": group,
                "enable.auto.commit": False,
                "client.id": f"clipstream-dedup-{uuid.uuid4().hex[:8]}",
            }
        )
    )


def _first_redelivered(consumer: Consumer, partitions: list[int]) -> dict[int, int]:
    """Per query partition with queries past its committed offset, the timestamp (ms) of
    the first of them: the first query the next owner reads again."""
    queries = [TopicPartition(topics.QUERIES, p) for p in partitions]
    committed = {tp.partition: tp.offset for tp in consumer.committed(queries, timeout=30)}
    firsts: dict[int, tuple[int, int]] = {}
    for p, (low, high) in partition_watermarks(consumer, topics.QUERIES, partitions, 30).items():
        c = committed.get(p, OFFSET_INVALID)
        c = low if c < 0 else max(c, low)
        if c < high:
            firsts[p] = (c, c + 1)
    first: dict[int, int] = {}
    if not firsts:
        return first
    try:
        for msg in read_ranges(consumer, topics.QUERIES, firsts, 30, max_messages=100):
            first[msg.partition()] = msg.timestamp()[1]
    except TimeoutError:
        pass  # the partitions missing are read whole, below
    consumer.unassign()
    missing = set(firsts) - set(first)
    if missing:
        # rather read all of a partition than miss an answered query
        log.warning("no timestamp for redelivered queries of %s: reading all", missing)
        first.update(dict.fromkeys(missing, 0))
    return first


def _plan(consumer: Consumer, settings: Settings, partitions: list[int], now_ms: int) -> Plan:
    first = _first_redelivered(consumer, partitions)
    skew_ms = PREDICTION_SKEW_US // 1000
    recent_from: dict[int, int] = {}
    if first:  # offsets_for_times rejects an empty list
        found = consumer.offsets_for_times(
            [
                TopicPartition(topics.PREDICTIONS, p, max(0, ts - skew_ms))
                for p, ts in first.items()
            ],
            timeout=30,
        )
        recent_from = {tp.partition: tp.offset for tp in found}
    memory_from = {
        tp.partition: tp.offset
        for tp in consumer.offsets_for_times(
            [
                TopicPartition(topics.PREDICTIONS, p, now_ms - int(settings.answer_ttl_s * 1000))
                for p in partitions
            ],
            timeout=30,
        )
    }
    # the answer memory holds answer_memory entries over all partitions
    cap = max(1, settings.answer_memory // max(1, settings.partitions))
    out = Plan()
    for p, (low, high) in partition_watermarks(
        consumer, topics.PREDICTIONS, partitions, 30
    ).items():
        # offsets_for_times gives -1 when nothing is that recent: nothing to read
        recent = recent_from.get(p, -1)
        recent = high if recent < 0 else max(low, recent)
        memory = memory_from.get(p, -1)
        memory = high if memory < 0 else max(low, memory, high - cap)
        if recent < high:
            out.recent[p] = (recent, high)
        if memory < recent:
            out.older[p] = (memory, recent)
    return out


def read(
    settings: Settings,
    ranges: dict[int, tuple[int, int]],
    group: str,
    key_of: Callable[[Mapping[str, Any]], str],
) -> tuple[list[tuple[str, int, Remembered | None]], Restored]:
    """The query ids answered in these ranges of the predictions topic, each with the time
    its prediction was emitted and its answer memory entry (blocking I/O: the worker runs
    it in a thread and applies the result with ``Pipeline.restore``)."""
    started = time.monotonic()
    done = Restored()
    found: list[tuple[str, int, Remembered | None]] = []
    if not any(start < end for start, end in ranges.values()):
        return found, done
    consumer = _consumer(settings, group)
    try:
        for msg in read_ranges(consumer, topics.PREDICTIONS, ranges, 300):
            try:
                record = codec.decode("Prediction", msg.value())
            except codec.DecodeError:
                continue
            remembered = remembered_from(record, key_of(record))
            found.append((record["query_id"], record["emitted_at_us"], remembered))
            done.predictions += 1
    finally:
        consumer.close()
    done.seconds = time.monotonic() - started
    return found, done
