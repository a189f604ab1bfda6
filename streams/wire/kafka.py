"""Small helpers over confluent-kafka shared by the SDK, the replicas and the tools."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from clipstream.streams.wire.config import Settings

log = logging.getLogger("clipstream.kafka")


#: How long a fetch waits at the broker for data that is not there. A fetch with data
#: returns at once whatever this is (one hop's p50 was 1.7-1.9 ms with 5 or 500 ms alike),
#: so it only decides how often an idle consumer asks: at 5 ms every idle consumer fetched
#: 200 times a second, which the broker paid for. The bench's hand-written loops use it
#: too, so a comparison is about the loop, not the client settings.
FETCH_WAIT_MS = 100


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Wait up to ``timeout`` for the first message, then take what is already fetched.

    ``Consumer.consume(n, timeout)`` waits for ``n`` messages or the whole timeout, which
    adds up to ``timeout`` to the latency of every message at light load."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]


#: answers a partition gives while its leadership settles (just after the topic was
#: created, or a broker restarted): asking again shortly succeeds
LEADER_MOVING = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
}


def produce(
    producer: Any, topic: str, value: bytes | None, key: bytes | None = None, **kw: Any
) -> None:
    """``producer.produce``, waiting for room when librdkafka's local queue is full (a
    broker away for a while): BufferError is back-pressure, not a failure to report."""
    while True:
        try:
            producer.produce(topic, value, key, **kw)
            return
        except BufferError:
            producer.poll(0.05)  # deliveries drain the queue


def watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """``get_watermark_offsets``, asked again while the partition's leader settles (for a
    second or so after its topic was created) instead of failing."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() not in LEADER_MOVING or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def partition_watermarks(
    consumer: Consumer, topic: str, partitions: Iterable[int], timeout: float
) -> dict[int, tuple[int, int]]:
    """(low, high) watermarks of each of ``topic``'s ``partitions`` (``watermarks``: asked
    again while a leader settles)."""
    return {p: watermarks(consumer, TopicPartition(topic, p), timeout) for p in partitions}


def read_ranges(
    consumer: Consumer,
    topic: str,
    ranges: Mapping[int, tuple[int, int]],
    timeout: float,
    *,
    max_messages: int = 1000,
) -> Iterator[Message]:
    """The messages at offsets [start, end) of each partition of ``topic`` in ``ranges``
    (partition -> (start, end); an end is usually a high watermark asked before), read with
    ``consumer``, which this assigns to them; TimeoutError if they are not all read within
    ``timeout`` seconds (the messages read until then have been yielded).

    A partition is done at its last offset, or at the first message past its end: an
    offset a compaction or a transaction marker took leaves a gap that may hide the last.
    """
    ends = {p: end for p, (start, end) in ranges.items() if start < end}
    if not ends:
        return
    consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in sorted(ends)])
    deadline = time.monotonic() + timeout
    while ends:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic} partitions {sorted(ends)} not read within {timeout:g} s")
        for msg in consume_ready(consumer, max_messages, 0.2):
            p = msg.partition()
            if msg.error() is not None or p not in ends:
                continue
            offset, end = msg.offset(), ends[p]
            if offset + 1 >= end:
                del ends[p]
                if offset >= end:
                    continue
            yield msg


def group_session_timeout_ms(settings: Settings) -> int:
    """The session timeout a worker or replica asks its group for: the configured one,
    raised to the broker's ``group.min.session.timeout.ms`` (a broker refuses anything
    shorter, and the member would never join)."""
    wanted = settings.session_timeout_ms
    try:
        admin = AdminClient(settings.kafka())
        brokers = admin.list_topics(timeout=10).brokers
        resource = ConfigResource(ConfigResource.Type.BROKER, str(min(brokers)))
        config = admin.describe_configs([resource])[resource].result(10)
        minimum = int(config["group.min.session.timeout.ms"].value)
    except Exception as exc:  # not allowed to describe the broker: ask, and see
        log.debug("broker's minimum session timeout unknown: %s", exc)
        return wanted
    if minimum > wanted:
        log.warning(
            "the broker's group.min.session.timeout.ms is %d ms: a crashed member's "
            "partitions move after that long, not after the %d ms configured",
            minimum,
            wanted,
        )
    return max(wanted, minimum)
