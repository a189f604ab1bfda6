"""Exactly one prediction per query id across worker crashes, restarts and rebalances.

A query's offset is committed only once its prediction is delivered, so after a crash or a
rebalance the queries past the committed offset are read again by the partition's next
owner, some of them already answered. The mechanism here is idempotent de-duplication
before the predictions topic (not Kafka transactions: the worker consumes with Faust's
aiokafka consumer and produces in bulk with librdkafka, and a librdkafka transaction
can only carry the offsets of a librdkafka consumer's group):

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
``MAX_CLOCK_SKEW_US`` (a prediction is produced after its query was read, so only clock
skew between the app's and the worker's hosts can put it earlier), or further back to
cover the answer memory's time to live, bounded by its capacity.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

from streams import codec, metrics, topics
from streams.config import Settings
from streams.kafka_util import consume_ready
from streams.pipeline import MAX_CLOCK_SKEW_US, Remembered

log = logging.getLogger("clipstream.dedup")


@dataclass
class Restored:
    """What one restore read: predictions seen, per partition where the read started."""

    predictions: int = 0
    remembered: int = 0
    seconds: float = 0.0
    starts: dict[int, int] | None = None


def remembered_from(record: dict, key: str) -> Remembered | None:
    """The answer memory entry a prediction stands for (None if it has no model answers,
    as an error prediction: feedback for it is rejected live and skipped by replay)."""
    if not record["answers"]:
        return None
    return Remembered(
        key=key,
        app=record["app"],
        labels={
            a["model"]: (a["label"] if a["error"] is None else None) for a in record["answers"]
        },
        probs={a["model"]: a["prob"] for a in record["answers"]},
        at_us=record["emitted_at_us"] - record["worker_us"],
    )


def read_starts(
    consumer: Consumer, settings: Settings, partitions: list[int], now_ms: int
) -> dict[int, int]:
    """Per predictions partition, the offset to read from (see the module docstring)."""
    queries = [TopicPartition(topics.QUERIES, p) for p in partitions]
    committed = {tp.partition: tp.offset for tp in consumer.committed(queries, timeout=30)}
    # the timestamp of the first query that will be redelivered, per partition
    first_redelivered: dict[int, int] = {}
    redelivered = []
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topics.QUERIES, p), timeout=30)
        c = committed.get(p, OFFSET_INVALID)
        c = low if c < 0 else max(c, low)
        if c < high:
            redelivered.append(TopicPartition(topics.QUERIES, p, c))
    if redelivered:
        consumer.assign(redelivered)
        deadline = time.monotonic() + 30
        while len(first_redelivered) < len(redelivered) and time.monotonic() < deadline:
            for msg in consume_ready(consumer, 100, 0.2):
                if msg.error() is None and msg.partition() not in first_redelivered:
                    first_redelivered[msg.partition()] = msg.timestamp()[1]
        consumer.unassign()
        missing = {tp.partition for tp in redelivered} - set(first_redelivered)
        if missing:
            # rather read all of a partition than miss an answered query
            log.warning("no timestamp for redelivered queries of %s: reading all", missing)
            first_redelivered.update(dict.fromkeys(missing, 0))
    memory_from_ms = now_ms - int(settings.answer_ttl_s * 1000)
    memory_found = consumer.offsets_for_times(
        [TopicPartition(topics.PREDICTIONS, p, memory_from_ms) for p in partitions], timeout=30
    )
    dedup_found = []
    if first_redelivered:
        skew_ms = MAX_CLOCK_SKEW_US // 1000
        dedup_found = consumer.offsets_for_times(
            [
                TopicPartition(topics.PREDICTIONS, p, max(0, ts - skew_ms))
                for p, ts in first_redelivered.items()
            ],
            timeout=30,
        )
    starts: dict[int, int] = {}
    for tp in memory_found:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topics.PREDICTIONS, tp.partition), timeout=30
        )
        at = tp.offset if tp.offset >= 0 else high  # -1: nothing that recent
        starts[tp.partition] = max(low, at, high - settings.answer_memory)
    for tp in dedup_found:
        if tp.offset >= 0:
            starts[tp.partition] = min(starts[tp.partition], tp.offset)
    return starts


def read_answered(
    settings: Settings, partitions: Iterable[int], group: str
) -> tuple[list[tuple[str, Remembered | None]], Restored]:
    """Every query id answered on these partitions, with its answer memory entry, read from
    the predictions topic (blocking I/O: the worker runs it in a thread and applies the
    result with ``Pipeline.restore`` before serving the partitions)."""
    started = time.monotonic()
    parts = sorted(set(partitions))
    done = Restored(starts={})
    found: list[tuple[str, Remembered | None]] = []
    if not parts:
        return found, done
    consumer = Consumer(
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
    try:
        starts = read_starts(consumer, settings, parts, time.time_ns() // 1_000_000)
        done.starts = starts
        ends: dict[int, int] = {}
        assignment = []
        for p, start in starts.items():
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topics.PREDICTIONS, p), timeout=30
            )
            if start < high:
                ends[p] = high
                assignment.append(TopicPartition(topics.PREDICTIONS, p, start))
        if assignment:
            consumer.assign(assignment)
        deadline = time.monotonic() + 120
        while ends and time.monotonic() < deadline:
            for msg in consume_ready(consumer, 1000, 0.2):
                if msg.error() is not None or msg.partition() not in ends:
                    continue
                if msg.offset() + 1 >= ends[msg.partition()]:
                    del ends[msg.partition()]
                try:
                    record = codec.decode("Prediction", msg.value())
                except codec.DecodeError:
                    continue
                key = msg.key().decode() if msg.key() else record["app"]
                remembered = remembered_from(record, key)
                found.append((record["query_id"], remembered))
                done.predictions += 1
                done.remembered += remembered is not None
        if ends:
            raise TimeoutError(f"predictions partitions {sorted(ends)} not read within 120 s")
    finally:
        consumer.close()
    done.seconds = time.monotonic() - started
    metrics.STAGE_LATENCY.labels("restore").observe(done.seconds)
    return found, done
