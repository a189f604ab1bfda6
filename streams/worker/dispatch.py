"""Rows to models: a queue and a batching policy per model version, in-flight slots per
model, and one ModelBatch message per batch (the worker's side of the model abstraction
layer; the replica's side is clipstream.models.replica).

Rows of every partition this worker serves share one queue per model version, so a busy
model gets full batches rather than four thin ones. A replica answers on the partition a
batch names; any partition of this worker's will do."""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.kafka import produce
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.batching import AIMDController, BatchPolicy, BatchQueue
from clipstream.streams.worker.pending import PendingQueries

# A batch unanswered this long no longer holds one of its model's in-flight slots (its
# replica died, or its answer went to a partition this worker gave up).
INFLIGHT_TIMEOUT_US = 10_000_000
#: round trips kept per model to judge which rows can still be answered in time
TRIPS_KEPT = 4
#: an idle model's row waits for a second one (worker.batching.BatchPolicy) only if its
#: query has at least this many times the wait left before its deadline: an app with a
#: tight deadline (Clipper's 20 ms) spends none of it on batching
IDLE_WAIT_SLACK = 4


@dataclass(slots=True)
class InFlight:
    model: str
    rows: int
    sent_us: int


class Dispatcher:
    def __init__(
        self,
        producer: Any,
        sensor: Sensor,
        inflight_per_replica: int = 1,
        idle_wait_us: float = 0.0,
    ) -> None:
        self.producer = producer
        self.sensor = sensor
        self.inflight_per_replica = inflight_per_replica
        self.idle_wait_us = idle_wait_us
        self.queues: dict[tuple[str, int], BatchQueue[str]] = {}
        self.policies: dict[str, BatchPolicy] = {}
        #: the (latency objective, batch max, batch wait) each model's policy was made for
        self.policy_specs: dict[str, tuple[float, int, float]] = {}
        #: batches sent and not answered, oldest first
        self.batches: OrderedDict[str, InFlight] = OrderedDict()
        self.inflight: dict[str, int] = {}
        #: live replicas per model (consumer-group members), kept current by the worker
        self.replicas: dict[str, int] = {}
        #: per model, the last few round trips of a batch (sent to answered), in us
        self.trips: dict[str, deque[float]] = {}
        self.hopeless_rows = 0

    # -- rows in ----------------------------------------------------------------------

    def enqueue(
        self, model: str, version: int, spec: Mapping[str, Any], qid: str, now: int
    ) -> None:
        queue = self.queues.get((model, version))
        if queue is None:
            queue = self.queues[(model, version)] = BatchQueue()
        wanted = (spec["latency_slo_ms"], spec["batch_max"], spec["batch_wait_ms"])
        if self.policy_specs.get(model) != wanted:
            # a redeploy's batch settings take effect at once (the AIMD limit starts again)
            self.policy_specs[model] = wanted
            self.policies[model] = BatchPolicy(
                AIMDController(
                    slo_us=spec["latency_slo_ms"] * 1000,
                    initial=min(32, spec["batch_max"]),
                    max_size=spec["batch_max"],
                ),
                max_wait_us=spec["batch_wait_ms"] * 1000,
                idle_wait_us=self.idle_wait_us,
            )
        queue.add(qid, now)

    def queued(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (model, _), queue in self.queues.items():
            out[model] = out.get(model, 0) + len(queue)
        return out

    def prune(self, pending: PendingQueries) -> None:
        """Drop queued rows of queries no longer pending (answered at their deadline)."""
        for queue in self.queues.values():
            if len(queue):
                queue.retain(pending.__contains__)

    # -- batches out ------------------------------------------------------------------

    def dispatch(self, now: int, pending: PendingQueries) -> int | None:
        """Send the batches that are due; returns when the next partial batch is due."""
        wake: int | None = None
        for (model, version), queue in self.queues.items():
            if not len(queue):
                continue
            policy = self.policies[model]
            while len(queue) and self._has_slot(model):
                assert queue.oldest_us is not None
                idle = self.inflight.get(model, 0) == 0
                gap = self._gap(queue, now, pending) if idle else None
                n = policy.take(len(queue), now - queue.oldest_us, idle, gap)
                if not n:
                    break
                self._send(model, version, queue.take(n), now, pending)
            if len(queue):
                assert queue.oldest_us is not None
                idle = self.inflight.get(model, 0) == 0
                due = int(policy.due_us(queue.oldest_us, idle))
                # a due batch waiting for a slot is woken by the answer that frees it
                if due > now:
                    wake = due if wake is None else min(wake, due)
        return wake

    def _gap(self, queue: BatchQueue[str], now: int, pending: PendingQueries) -> float | None:
        """The queue's recent gap between rows, or None if its oldest row's query cannot
        afford to wait for another (see IDLE_WAIT_SLACK); None without an idle wait."""
        if not self.idle_wait_us:
            return None
        first = pending.get(queue.first())
        if first is None or first.deadline_us - now < IDLE_WAIT_SLACK * self.idle_wait_us:
            return None
        return queue.gap_us

    def _has_slot(self, model: str) -> bool:
        # a replica computes one batch while the next is on its way
        limit = self.inflight_per_replica * max(1, self.replicas.get(model, 1))
        return self.inflight.get(model, 0) < limit

    def _send(
        self, model: str, version: int, qids: list[str], now: int, pending: PendingQueries
    ) -> None:
        rows = [p for p in map(pending.get, qids) if p is not None]
        trip = self.expected_trip_us(model)
        if trip is not None and self.inflight.get(model, 0) > 0:
            # Overload: a busy model's queue is oldest first, so rows whose deadline comes
            # before a batch could return would use the model's time and still end as
            # defaults, starving the rows that can make it. An idle model gets every row
            # (and so keeps measuring its round trip).
            feasible = [p for p in rows if p.deadline_us - now >= trip]
            if len(feasible) < len(rows):
                self.hopeless_rows += len(rows) - len(feasible)
                self.sensor.on_hopeless_rows(model, len(rows) - len(feasible))
                rows = feasible
        if not rows:
            return
        # Without a known input dimension rows may differ in length: one matrix per width,
        # and the replica tells each row whether its width fits the model.
        width = len(rows[0].features)
        other = [p for p in rows if len(p.features) != width]
        if other:
            rows = [p for p in rows if len(p.features) == width]
            self._send(model, version, [p.query_id for p in other], now, pending)
        X = np.asarray([p.features for p in rows], dtype="<f8").reshape(len(rows), width)
        batch_id = uuid.uuid4().hex
        batch = {
            "batch_id": batch_id,
            "model": model,
            "version": version,
            "reply_partition": rows[0].partition,
            "query_ids": [p.query_id for p in rows],
            "rows": X.shape[0],
            "cols": X.shape[1],
            "inputs": X.tobytes(),
            "sent_at_us": now,
            "deadline_at_us": min(p.deadline_us for p in rows),
        }
        produce(
            self.producer,
            topics.model_requests(model),
            codec.encode("ModelBatch", batch),
            batch_id.encode(),
            on_delivery=partial(self._delivered, batch_id),
        )
        self.inflight[model] = self.inflight.get(model, 0) + 1
        self.batches[batch_id] = InFlight(model, len(rows), now)
        self.sensor.on_batch_sent(model, len(rows))

    def _delivered(self, batch_id: str, err: Any, _msg: Any) -> None:
        if err is not None:  # no answer will come: its queries end at their deadline
            self.release(batch_id)

    def expected_trip_us(self, model: str) -> float | None:
        """The fastest of the model's last round trips: a row whose deadline comes before
        even that cannot be answered in time. One slow trip (a replica starting, a pause)
        does not make every row look hopeless; a model that stays slow does."""
        trips = self.trips.get(model)
        return min(trips) if trips is not None and len(trips) >= 2 else None

    # -- answers in -------------------------------------------------------------------

    def release(self, batch_id: str) -> InFlight | None:
        sent = self.batches.pop(batch_id, None)
        if sent is not None:
            self.inflight[sent.model] = max(0, self.inflight.get(sent.model, 0) - 1)
        return sent

    def answered(self, batch_id: str, model: str, model_us: float, now: int) -> None:
        """A batch's answer came: free its slot and teach AIMD and the round trip."""
        sent = self.release(batch_id)
        if sent is None or sent.model != model:
            return  # a stray answer frees the slot of the model its batch went to, only
        trips = self.trips.get(model)
        if trips is None:
            trips = self.trips[model] = deque(maxlen=TRIPS_KEPT)
        trips.append(float(now - sent.sent_us))
        policy = self.policies.get(model)
        if policy is not None:
            limit = policy.controller.observe(sent.rows, model_us)
            self.sensor.on_batch_answered(model, model_us / 1e6, limit)

    def expire(self, now: int) -> None:
        """Forget batches whose answer never came, so their slots are not held forever;
        their queries are answered at their deadline regardless."""
        batches = self.batches
        while batches:
            batch_id, sent = next(iter(batches.items()))
            if now - sent.sent_us < INFLIGHT_TIMEOUT_US:
                break
            self.release(batch_id)
