"""Small helpers over confluent-kafka shared by the SDK, the replicas and the tools."""

from __future__ import annotations

from confluent_kafka import Consumer, Message


def consume_ready(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Wait up to ``timeout`` for the first message, then take what is already fetched.

    ``Consumer.consume(n, timeout)`` waits for ``n`` messages or the whole timeout, which
    adds up to ``timeout`` to the latency of every message at light load."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]
