"""The worker's query path, free of Kafka's clients so that it can be driven and tested
directly: a chain of small stages, each in its own module, composed here.

    queries ─► intake (decode, validate, deadline, cache, selection, queue) ─► dispatch
            (per-model queue, batching policy, in-flight slots) ─► replicas
    answers ─► answer_join (per query) ─► predictions (merge: ensemble, straggler,
            default; remember; emit)
    feedback ─► feedback (join with the answer memory) ─► observation for the key's owner
    rebalances ─► partition_moves (freeze, thaw, drop, restore)

Every input message is marked done in ``Offsets`` only once what it caused is on Kafka
(worker.emit), and the serving loop commits from there (worker.serving). Deadlines and
batch windows fire from ``tick``, which says when it next needs to run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from clipstream.models.control.registry import Registry
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.answer_join import AnswerJoin
from clipstream.streams.worker.answers import AnswerMemory, EmittedIds, Remembered
from clipstream.streams.worker.cache import PredictionCache
from clipstream.streams.worker.dispatch import Dispatcher
from clipstream.streams.worker.emit import Emitter
from clipstream.streams.worker.feedback import FeedbackJoin
from clipstream.streams.worker.inputs import Inputs, MessageLike
from clipstream.streams.worker.intake import Intake, StateSource
from clipstream.streams.worker.offsets import Offsets
from clipstream.streams.worker.partition_moves import PartitionMoves
from clipstream.streams.worker.pending import PendingQueries
from clipstream.streams.worker.predictions import Predictions

__all__ = ["MessageLike", "Pipeline", "StateSource"]

# How often queued rows of queries already answered at their deadline are dropped.
PRUNE_INTERVAL_US = 50_000
TICK_REPORT_US = 1_000_000


class Pipeline:
    """The stages and the state they share; the serving loop calls the ``on_*`` methods
    with a batch of messages each, ``tick`` when time is due, and the rest on rebalances."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        producer: Any,
        states: StateSource,
        *,
        sensor: Sensor | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.producer = producer
        self.states = states
        self.sensor = sensor = sensor or Sensor()
        self.rng = rng = rng or np.random.default_rng()
        self.offsets = offsets = Offsets()
        self.pending = pending = PendingQueries()
        self.dispatch = dispatch = Dispatcher(
            producer,
            sensor,
            settings.inflight_per_replica,
            settings.batch_idle_wait_ms * 1000,
        )
        self.emitter = emitter = Emitter(producer, offsets, sensor)
        self.cache = cache = PredictionCache(settings.cache_size)
        self.emitted = emitted = EmittedIds(settings.dedup_memory)
        self.memory = memory = AnswerMemory(settings.answer_memory, settings.answer_ttl_s)
        self.counts = counts = {"queries": 0, "duplicates": 0, "late_answers": 0, "defaults": 0}
        inputs = Inputs(emitter)
        self.predictions = predictions = Predictions(
            registry, emitter, emitted, memory, sensor, counts
        )
        self.moves = moves = PartitionMoves(
            registry,
            sensor=sensor,
            offsets=offsets,
            pending=pending,
            emitted=emitted,
            memory=memory,
            predictions=predictions,
        )
        self.intake = Intake(
            settings,
            registry,
            states,
            rng,
            sensor=sensor,
            offsets=offsets,
            pending=pending,
            dispatch=dispatch,
            emitter=emitter,
            cache=cache,
            emitted=emitted,
            inputs=inputs,
            predictions=predictions,
            counts=counts,
        )
        self.answers = AnswerJoin(
            registry,
            sensor=sensor,
            offsets=offsets,
            pending=pending,
            dispatch=dispatch,
            cache=cache,
            frozen=moves.frozen,
            inputs=inputs,
            predictions=predictions,
            counts=counts,
        )
        self.feedback = FeedbackJoin(
            settings,
            registry,
            sensor=sensor,
            offsets=offsets,
            emitter=emitter,
            emitted=emitted,
            memory=memory,
            inputs=inputs,
            pending=pending,
        )
        self._next_prune = 0
        self._next_report = 0

    @property
    def frozen(self) -> set[int]:
        """Partitions handed over in a rebalance, whose predictions are held."""
        return self.moves.frozen

    def on_queries(self, messages: Iterable[MessageLike], now: int) -> None:
        self.intake.on_queries(messages, now)

    def on_results(self, messages: Iterable[MessageLike], now: int) -> None:
        self.answers.on_results(messages, now)

    def on_feedback(self, messages: Iterable[MessageLike], now: int) -> None:
        self.feedback.on_feedback(messages, now)

    def tick(self, now: int) -> int | None:
        """Answer queries whose deadline passed and send due batches; returns when to tick
        next (us since the epoch), or None when nothing waits."""
        frozen, emit = self.moves.frozen, self.predictions.emit
        for p in self.pending.expired(now):
            if p.partition in frozen:
                self.moves.hold(p)
                continue
            self.sensor.on_deadline_miss(p.app)
            emit(p, now)
        self.feedback.unpark(now)
        dispatch = self.dispatch
        dispatch.expire(now)
        if now >= self._next_prune:
            # deadlines first, then the prune: rows of queries just answered with a
            # default are never sent to a model whose answer would come too late
            self._next_prune = now + PRUNE_INTERVAL_US
            dispatch.prune(self.pending)
        wake = dispatch.dispatch(now, self.pending)
        deadline = self.pending.next_deadline()
        if deadline is not None:
            wake = deadline if wake is None else min(wake, deadline)
        if now >= self._next_report:
            self._next_report = now + TICK_REPORT_US
            self.sensor.on_tick(len(self.pending), dispatch.queued())
        return wake

    def freeze(self, partitions: set[int]) -> None:
        self.moves.freeze(partitions)

    def thaw(self, partitions: set[int], now: int) -> None:
        self.moves.thaw(partitions, now)

    def drop(self, partitions: set[int]) -> int:
        self.feedback.drop(partitions)
        return self.moves.drop(partitions)

    def restore(self, found: list[tuple[str, int, Remembered | None]]) -> None:
        self.moves.restore(found)
