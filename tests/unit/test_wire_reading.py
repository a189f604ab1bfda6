"""The wire helpers the worker, the learning feed, replay and the SDK share: reading
partitions to their end offsets (streams/wire/kafka.py) and the one DeadLetter builder
(streams/wire/dead_letter.py)."""

from __future__ import annotations

import pytest

from clipstream.streams.wire import codec
from clipstream.streams.wire.dead_letter import encode_dead_letter
from clipstream.streams.wire.kafka import partition_watermarks, read_ranges


class Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class Logs:
    """A consumer over in-memory partitions: partition -> the offsets present (gaps are
    offsets compacted away)."""

    def __init__(self, offsets: dict[int, list[int]]) -> None:
        self.offsets = offsets
        self.queue: list[Msg] = []
        self.assigned: list = []

    def get_watermark_offsets(self, tp, timeout: float = 0) -> tuple[int, int]:
        present = self.offsets[tp.partition]
        return (present[0], present[-1] + 1) if present else (0, 0)

    def assign(self, tps: list) -> None:
        self.assigned = [(tp.partition, tp.offset) for tp in tps]
        self.queue = [
            Msg(tp.partition, o) for tp in tps for o in self.offsets[tp.partition] if o >= tp.offset
        ]

    def poll(self, timeout: float = 0) -> Msg | None:
        return self.queue.pop(0) if self.queue else None

    def consume(self, n: int, timeout: float = 0) -> list[Msg]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return out


def test_ranges_are_read_to_their_ends_and_no_further() -> None:
    logs = Logs({0: [0, 1, 2, 3, 4], 1: [0, 1], 2: []})
    marks = partition_watermarks(logs, "t", [0, 1, 2], 1.0)  # type: ignore[arg-type]
    assert marks == {0: (0, 5), 1: (0, 2), 2: (0, 0)}
    read = [
        (m.partition(), m.offset())
        for m in read_ranges(logs, "t", {0: (2, 4), **{p: marks[p] for p in (1, 2)}}, 1.0)
    ]  # type: ignore[arg-type]
    assert read == [(0, 2), (0, 3), (1, 0), (1, 1)]
    assert logs.assigned == [(0, 2), (1, 0)]  # nothing to read in partition 2


def test_a_gap_before_the_end_ends_the_partition_at_the_next_message() -> None:
    logs = Logs({0: [0, 1, 5, 6]})  # offsets 2-4 compacted away
    read = [m.offset() for m in read_ranges(logs, "t", {0: (0, 4)}, 1.0)]  # type: ignore[arg-type]
    assert read == [0, 1]


def test_a_range_not_read_in_time_raises_after_what_was_read() -> None:
    logs = Logs({0: [0, 1]})
    got: list[int] = []
    with pytest.raises(TimeoutError, match=r"t partitions \[0\] not read"):
        for m in read_ranges(logs, "t", {0: (0, 3)}, 0.3):  # type: ignore[arg-type]
            got.append(m.offset())
    assert got == [0, 1]


def test_one_dead_letter_record_for_every_component() -> None:
    value = encode_dead_letter("clipstream.queries", 3, 17, b"k", b"\x00bad", "why", "intake", "q")
    record = codec.decode("DeadLetter", value)
    assert record["source_topic"] == "clipstream.queries"
    assert (record["partition"], record["offset"], record["key"], record["value"]) == (
        3,
        17,
        b"k",
        b"\x00bad",
    )
    assert (record["reason"], record["stage"], record["query_id"]) == ("why", "intake", "q")
    assert record["at_us"] > 0
    anonymous = codec.decode(
        "DeadLetter", encode_dead_letter("t", 0, 0, None, None, "r", "replica")
    )
    assert anonymous["query_id"] is None and anonymous["key"] is None


def test_produce_waits_out_a_full_local_queue_and_needs_no_key() -> None:
    from clipstream.streams.wire.kafka import produce

    class Full:
        def __init__(self) -> None:
            self.refusals, self.sent, self.polls = 2, [], 0

        def produce(self, topic, value, key, **kw) -> None:
            if self.refusals:
                self.refusals -= 1
                raise BufferError("Local: Queue full")
            self.sent.append((topic, value, key, kw))

        def poll(self, timeout: float) -> int:
            self.polls += 1
            return 0

    producer = Full()
    produce(producer, "t", b"v", partition=3)
    assert producer.sent == [("t", b"v", None, {"partition": 3})]
    assert producer.polls == 2  # deliveries drained between the refusals
