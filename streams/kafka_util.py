"""Small helpers over confluent-kafka shared by the SDK, the replicas and the tools."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition


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
