"""Records out of the worker, each tied to the input message it finishes.

A prediction or a dead letter is produced with the input message it completes (topic,
partition, offset), a message of observations with the feedback they join and selection
states with the observations folded into them (a ``Group``); an input is marked done in
``Offsets`` only when Kafka has what it caused, so the offset committed never passes an
input whose result could still be lost.
A produce Kafka refuses for good (a record too large for the topic,
no permission) is retried once, then dead-lettered with the reason, and the input counts
as done: one bad record must not stop its partition. A produce that fails only for a
while (the broker unreachable, a leader election) is never produced again from here: the
idempotent producer retries it itself, in order, with no timeout (``PRODUCER_CONFIG``),
whereas a second ``produce`` would land after records produced later to its partition (an
older selection state after a newer one, which compaction would keep). If such a failure
still reaches us (an operator set a delivery timeout), the emitter is ``broken``: the
serving loop stops without committing past the record, and the next owner redoes it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import KafkaError

from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.dead_letter import encode_dead_letter
from clipstream.streams.wire.kafka import produce
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.offsets import Offsets

log = logging.getLogger("clipstream.emit")

Source = tuple[str, int, int]  # topic, partition, offset
#: a message of observations is split above this size (the broker's default limit is 1 MB)
MAX_OBSERVATIONS_BYTES = 256 << 10
#: the worker's producer: librdkafka retries a record until it is delivered, in order
PRODUCER_CONFIG = {"enable.idempotence": True, "message.timeout.ms": 0}


class EmitterBroken(RuntimeError):
    """A record failed for a while and cannot be produced again in its place in order."""


class Group:
    """Inputs that are done once every one of several records is delivered."""

    __slots__ = ("sources", "waiting")

    def __init__(self, sources: list[Source], waiting: int) -> None:
        self.sources = sources
        self.waiting = waiting


@dataclass(slots=True)
class Outgoing:
    topic: str
    value: bytes
    key: bytes | None
    partition: int
    source: Source | Group | None
    attempts: int = 0


class Emitter:
    def __init__(self, producer: Any, offsets: Offsets, sensor: Sensor) -> None:
        self.producer = producer
        self.offsets = offsets
        self.sensor = sensor
        self.counts = {"predictions": 0, "dead_letters": 0, "observations": 0, "redelivered": 0}
        #: selection changelog partition -> the offset after the last state delivered
        self.states_written: dict[int, int] = {}
        #: called with a record that could not be delivered (tests, the worker's log)
        self.on_undeliverable: Callable[[Outgoing, str], None] | None = None
        #: called with each message of observations produced: its partition, bytes and records
        self.on_observation: Callable[[int, bytes, list[dict[str, Any]]], None] | None = None
        #: why a record could not be delivered in order (the serving loop then stops)
        self.broken: str | None = None

    def prediction(self, record: dict[str, Any], partition: int, source: Source | None) -> None:
        # A prediction goes to its query's partition number: worker.dedup rebuilds the
        # answered ids of a query partition from the same predictions partition. Its key is
        # the query id, so a reader waiting for some ids need not decode the others.
        value = codec.encode("Prediction", record)
        self.counts["predictions"] += 1
        self._produce(
            Outgoing(topics.PREDICTIONS, value, record["query_id"].encode(), partition, source)
        )

    def observations(
        self, partition: int, records: list[dict[str, Any]], sources: list[Source]
    ) -> None:
        """Observations for one partition of clipstream.observations (the one whose owner
        writes their keys' states: learning.learner), in one message; ``sources``, the
        feedback record each one joins, are done once it is delivered."""
        value = codec.encode("ObservationBatch", {"observations": records})
        if len(value) > MAX_OBSERVATIONS_BYTES and len(records) > 1:
            # feedback with large labels: halves, each under the broker's message limit
            half = len(records) // 2
            self.observations(partition, records[:half], sources[:half])
            self.observations(partition, records[half:], sources[half:])
            return
        self.counts["observations"] += len(records)
        self._produce(Outgoing(topics.OBSERVATIONS, value, None, partition, Group(sources, 1)))
        if self.on_observation is not None:
            self.on_observation(partition, value, records)

    def states(
        self,
        records: list[tuple[bytes, bytes, int]],
        sources: list[Source],
        rejected: Sequence[tuple[bytes, bytes, int, int, str]] = (),
    ) -> None:
        """Selection states (key, value, partition) to the table's changelog, and dead
        letters for the observations of ``sources`` that were not folded (key, value,
        partition, offset, reason); ``sources`` are done when all of them are delivered."""
        if not records and not rejected:
            for source in sources:
                self.offsets.done(*source)
            return
        group = Group(sources, len(records) + len(rejected))
        for key, value, partition in records:
            self._produce(Outgoing(topics.SELECTION_CHANGELOG, value, key, partition, group))
        for key, value, partition, offset, reason in rejected:
            self.dead_letter(
                topics.OBSERVATIONS, partition, offset, key, value, reason, "learn", done=group
            )

    def dead_letter(
        self,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        stage: str,
        query_id: str | None = None,
        done: Source | Group | None = None,
    ) -> None:
        """Record bad input with its original bytes; ``done`` is marked once it is safe."""
        self.counts["dead_letters"] += 1
        self.sensor.on_dead_letter(stage)
        record = encode_dead_letter(
            source_topic, partition, offset, key, value, reason, stage, query_id
        )
        out = Outgoing(topics.DEADLETTER, record, key, -1, done)
        self._produce(out)

    def _produce(self, out: Outgoing) -> None:
        out.attempts += 1
        where = {"partition": out.partition} if out.partition >= 0 else {}
        try:
            produce(
                self.producer,
                out.topic,
                out.value,
                out.key,
                on_delivery=partial(self._delivered, out),
                **where,
            )
        except Exception as exc:  # refused before it left: too large, unknown topic
            self._failed(out, str(exc), permanent=True)

    def _delivered(self, out: Outgoing, err: Any, msg: Any) -> None:
        if err is None:
            if out.topic == topics.SELECTION_CHANGELOG:
                written = self.states_written
                written[out.partition] = max(written.get(out.partition, 0), msg.offset() + 1)
            self._done(out.source)
            return
        timed_out = err.code() == KafkaError._MSG_TIMED_OUT or err.retriable()
        self._failed(out, str(err), permanent=not timed_out)

    def check(self) -> None:
        """Raise ``EmitterBroken`` if a record could not be delivered in its order."""
        if self.broken is not None:
            raise EmitterBroken(self.broken)

    def _failed(self, out: Outgoing, reason: str, permanent: bool) -> None:
        if not permanent:
            self.sensor.on_delivery_failed(out.topic, "stopped")
            log.error("%s record not delivered in order (%s): stopping", out.topic, reason)
            if self.broken is None:
                self.broken = f"{out.topic} record not delivered ({reason})"
            return
        if out.attempts < 2:
            self.counts["redelivered"] += 1
            self.sensor.on_delivery_failed(out.topic, "retried")
            log.warning("%s record not delivered (%s): producing it again", out.topic, reason)
            self._produce(out)
            return
        self.sensor.on_delivery_failed(out.topic, "dead_lettered")
        log.error("%s record not delivered after %d attempts: %s", out.topic, out.attempts, reason)
        if self.on_undeliverable is not None:
            self.on_undeliverable(out, reason)
        if out.topic == topics.DEADLETTER:
            # nowhere left to put it: say so, and let the partition move on
            self._done(out.source)
            return
        self.dead_letter(
            out.topic,
            out.partition,
            -1,
            out.key,
            out.value,
            f"not delivered to {out.topic}: {reason}",
            "emit",
            query_id=out.key.decode() if out.topic == topics.PREDICTIONS and out.key else None,
            done=out.source,
        )

    def _done(self, source: Source | Group | None) -> None:
        if source is None:
            return
        if isinstance(source, Group):
            source.waiting -= 1
            if source.waiting:
                return
            for each in source.sources:
                self.offsets.done(*each)
            return
        self.offsets.done(*source)
