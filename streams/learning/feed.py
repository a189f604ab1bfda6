"""What a worker learns from, read in batches off the query path.

One consumer per worker reads the selection table's changelog (every partition, into the
worker's StateView) and the feedback and observations of the serving group's partitions
this worker holds (handed to the serving loop). None of it is on a query's path: a
feedback record's worth is in the weights it moves, not in a few milliseconds more or
less. So this consumer asks the broker to hold each fetch until it has ``MIN_BYTES`` or
``batch_ms`` have passed (``fetch.min.bytes`` / ``fetch.wait.max.ms``): at a steady rate
each record was otherwise a fetch, a hand-over and a wake-up of its own, three of them
per feedback record (the feedback, its observation, the state write every worker reads),
and cost a worker 500-1,300 us where a burst's record costs 80 (docs/benchmarks.md). In
a batch those are shared, and each selection key's state is written once per batch. What
must not wait for a held fetch (the changelog's end offsets, a start-up's read of the
changelog) goes through a short-lived client of its own.

The serving loop's consumer stays the group member: the range assignor gives it the same
partition numbers of queries, feedback and observations; it keeps feedback and
observations paused and commits their offsets with its others (worker.offsets). This
consumer is assigned them (incrementally, no subscription) under the serving group's id,
so a partition taken over starts from the offset its previous owner committed. Every
observation batch is written as it is folded (ServingLoop._learn), so a revocation or a
clean stop finds nothing folded and unwritten."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import FETCH_WAIT_MS, partition_watermarks, read_ranges

log = logging.getLogger("clipstream.learning")

#: a fetch returns once it has this much (a few hundred records: a burst need not wait,
#: larger batches save little more); at a steady few hundred records a second the wait
#: decides
MIN_BYTES = 64 << 10
LEARNED = (topics.FEEDBACK, topics.OBSERVATIONS)


class ChangelogReader(Protocol):
    """Where changelog records go (a StateView, or a replay's latest states)."""

    def apply(self, key: str, value: bytes | None) -> None: ...


class LearningFeed:
    def __init__(
        self,
        settings: Settings,
        view: ChangelogReader,
        *,
        group: str | None = None,
        batch_ms: float = 0.0,
        on_staleness: Callable[[float], None] | None = None,
    ) -> None:
        """``group``: the serving group whose feedback and observations are read (None:
        the changelog only). ``batch_ms``: how long the broker holds a fetch to batch
        (0: each fetch returns as soon as anything is there); ``on_staleness``: called
        with each changelog record's age in seconds as it is read."""
        self.settings = settings
        self.view = view
        self.on_staleness = on_staleness
        #: changelog partition -> the offset after the last record read
        self.position: dict[int, int] = {}
        #: (topic, partition) of feedback and observations read now
        self.reading: set[tuple[str, int]] = set()
        #: changelog partitions this worker writes, and does not read (``own``)
        self.owned: set[int] = set()
        #: the last drain took all it was allowed: more is fetched and waiting
        self.behind = False
        self.consumer = Consumer(
            settings.kafka(
                **{
                    # assign(), never subscribe(): this consumer is no member of the group;
                    # the id only names whose committed offsets a partition starts from
                    "group.id": group or f"clipstream-state-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # a partition the group never committed is read from its start, as
                    # the serving consumer's are
                    "auto.offset.reset": "earliest",
                    "enable.partition.eof": False,
                    "fetch.wait.max.ms": int(batch_ms) if batch_ms > 0 else FETCH_WAIT_MS,
                    "fetch.min.bytes": MIN_BYTES if batch_ms > 0 else 1,
                }
            )
        )
        md = self.consumer.list_topics(topics.SELECTION_CHANGELOG, timeout=30)
        self.partitions = sorted(md.topics[topics.SELECTION_CHANGELOG].partitions)
        #: the changelog is assigned here once catch_up() has read it to its end
        self.following = False

    # -- feedback and observations ---------------------------------------------------------

    def read(self, topic: str, partitions: Mapping[int, int | None]) -> None:
        """Read these partitions of ``topic`` from the offsets given (None: from the
        serving group's committed offset)."""
        new = [
            TopicPartition(topic, p, OFFSET_STORED if at is None else at)
            for p, at in partitions.items()
            if (topic, p) not in self.reading
        ]
        if new:
            self.consumer.incremental_assign(new)
            self.reading.update((tp.topic, tp.partition) for tp in new)

    def stop_reading(self) -> None:
        """No more feedback or observations: what was fetched and not handed over is
        dropped (its next reader starts from the offsets committed)."""
        if self.reading:
            self.consumer.incremental_unassign([TopicPartition(t, p) for t, p in self.reading])
            self.reading.clear()

    def drain(self, max_messages: int) -> list[Message]:
        """Without waiting: apply the changelog records fetched (``max_messages`` records
        at most), and return the feedback and observations, in order per partition."""
        msgs = self.consumer.consume(max_messages, 0)
        self.behind = len(msgs) == max_messages
        if not msgs:
            return []
        learned = []
        now_ms = time.time() * 1000
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("learning feed: %s", err)
                continue
            if msg.topic() != topics.SELECTION_CHANGELOG:
                learned.append(msg)
                continue
            self._apply(msg)
            written = msg.timestamp()[1]
            if written > 0 and self.on_staleness is not None:
                self.on_staleness(max(0.0, now_ms - written) / 1000)
        return learned

    # -- the changelog ---------------------------------------------------------------------

    def own(self, partitions: Iterable[int]) -> None:
        """This worker writes these changelog partitions now (it folds the observations of
        the same numbers): it stops reading them, as every record there would be its own
        and its view holds those states already; at a steady rate that read was one in
        five of the messages a feedback record costs with two workers."""
        mine = [p for p in partitions if p not in self.owned]
        if mine:
            self.consumer.incremental_unassign(
                [TopicPartition(topics.SELECTION_CHANGELOG, p) for p in mine]
            )
            self.owned.update(mine)

    def disown(self, written: Mapping[int, int]) -> None:
        """Another worker may write the partitions this one owned: read them again from
        after the last state this worker had delivered there (``written``: partition ->
        that offset + 1), so the next writer's records are read and its own are not."""
        if not self.owned:
            return
        again = []
        for p in sorted(self.owned):
            at = max(self.position.get(p, 0), written.get(p, 0))
            self.position[p] = at
            again.append(TopicPartition(topics.SELECTION_CHANGELOG, p, at))
        self.consumer.incremental_assign(again)
        self.owned.clear()

    def catch_up(self, timeout: float = 60.0) -> int:
        """Read the changelog up to its end as of now (a restarted worker chooses from the
        weights it had), then follow it from there; call once, before ``drain``. Returns
        the number of records read.

        Read by a client of its own that the broker answers at once: this consumer's fetches
        are held up to ``batch_ms``, and a small changelog took 2.0 s to read instead of
        0.2 s at 1000 ms, each a second a restarted worker did not serve."""
        if self.following:
            raise RuntimeError("the changelog was caught up already: it is followed now")
        reader = self._unheld_consumer("catch-up")
        read = 0
        try:
            # a new client may ask before it knows a partition's leader: the helper waits
            marks = partition_watermarks(
                reader, topics.SELECTION_CHANGELOG, self.partitions, timeout
            )
            # from the low mark, not OFFSET_BEGINNING: that costs a round trip more (0.6 s
            # to the first record instead of 0.2)
            for msg in read_ranges(reader, topics.SELECTION_CHANGELOG, marks, timeout):
                self._apply(msg)
                read += 1
        finally:
            reader.close()
        # incremental, as feedback and observations are added and taken away later
        self.consumer.incremental_assign(
            [
                TopicPartition(
                    topics.SELECTION_CHANGELOG, p, self.position.get(p, OFFSET_BEGINNING)
                )
                for p in self.partitions
            ]
        )
        self.following = True
        return read

    def end_offsets(self, partitions: list[int], timeout: float = 5.0) -> dict[int, int]:
        """How far to read these changelog partitions to hold what was written to them
        until now (asked of the broker; safe from any thread); TimeoutError or
        KafkaException if the broker does not answer.

        Asked through a client of its own: on this consumer's connection the broker holds a
        fetch up to ``batch_ms`` and answers the connection's requests in order, so each
        question waited out a held fetch; and while one was out, a ``drain`` on this
        consumer from the serving thread waited too (measured: ``consume(256, 0)`` returned
        after 3.5 s, four partitions at 1000 ms), holding every query of the worker."""
        probe = self._unheld_consumer("ends")
        try:
            marks = partition_watermarks(probe, topics.SELECTION_CHANGELOG, partitions, timeout)
        finally:
            probe.close()
        # empty (or compacted away): nothing to read
        return {p: high if high > low else 0 for p, (low, high) in marks.items()}

    def _unheld_consumer(self, purpose: str) -> Consumer:
        """A short-lived consumer, in no group, whose fetches the broker answers at once."""
        return Consumer(
            self.settings.kafka(
                **{
                    "group.id": f"clipstream-{purpose}-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": False,
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                }
            )
        )

    def caught_up(self, ends: Mapping[int, int]) -> bool:
        """Every changelog record below these end offsets has been read."""
        return all(self.position.get(p, 0) >= end for p, end in ends.items())

    def _apply(self, msg: Message) -> None:
        self.position[msg.partition()] = msg.offset() + 1
        key = msg.key()
        if key is None:
            return
        self.view.apply(key.decode("utf-8", "replace"), msg.value())

    def close(self) -> None:
        self.consumer.close()
