"""The DeadLetter record, built in one place for the worker, the replicas and the SDK's
reader: bad input with its original bytes, where it was read and why it was refused."""

from __future__ import annotations

from clipstream.streams.wire import codec
from clipstream.streams.wire.clock import now_us


def encode_dead_letter(
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    stage: str,
    query_id: str | None = None,
) -> bytes:
    """The encoded DeadLetter for input read at ``source_topic``/``partition``/``offset``
    that ``stage`` (intake, merge, feedback, learn, replica, reader) refused, stamped now."""
    return codec.encode(
        "DeadLetter",
        {
            "source_topic": source_topic,
            "partition": partition,
            "offset": offset,
            "key": key,
            "value": value,
            "reason": reason,
            "stage": stage,
            "query_id": query_id,
            "at_us": now_us(),
        },
    )
