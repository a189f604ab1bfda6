"""The query path's first stage: a query message decoded and checked (app, input,
deadline), redelivered ones acknowledged without a second answer, its deadline set, its
models chosen from the selection state, each answered from the prediction cache if it
can be and otherwise queued for its model (worker.dispatch)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from clipstream.models.control.registry import Registry
from clipstream.selection import LEARNING, SelectionState, selection_key
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.limits import deadline_problem
from clipstream.streams.wire.sensors import UNKNOWN, Sensor
from clipstream.streams.worker import merge
from clipstream.streams.worker.answers import EmittedIds
from clipstream.streams.worker.cache import PredictionCache
from clipstream.streams.worker.dispatch import Dispatcher
from clipstream.streams.worker.emit import Emitter
from clipstream.streams.worker.inputs import Inputs, MessageLike, app_label
from clipstream.streams.worker.offsets import Offsets
from clipstream.streams.worker.pending import Answer, Pending, PendingQueries
from clipstream.streams.worker.predictions import Predictions

# A client clock further off than this (against the broker's stamp of the query) is not
# trusted: the deadline starts when the broker took the query in.
MAX_CLIENT_SKEW_US = 50_000
TIMESTAMP_LOG_APPEND_TIME = 2  # confluent_kafka.TIMESTAMP_LOG_APPEND_TIME


class StateSource(Protocol):
    def state_for(self, key: str, app: Mapping[str, Any]) -> SelectionState: ...


class Intake:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        states: StateSource,
        rng: np.random.Generator,
        *,
        sensor: Sensor,
        offsets: Offsets,
        pending: PendingQueries,
        dispatch: Dispatcher,
        emitter: Emitter,
        cache: PredictionCache,
        emitted: EmittedIds,
        inputs: Inputs,
        predictions: Predictions,
        counts: dict[str, int],
    ) -> None:
        self.registry = registry
        self.states = states
        self.rng = rng
        self.sensor = sensor
        self.offsets = offsets
        self.pending = pending
        self.dispatch = dispatch
        self.emitter = emitter
        self.cache = cache
        self.emitted = emitted
        self.inputs = inputs
        self._emit = predictions.emit
        self.counts = counts
        self.emit_margin_us = int(settings.emit_margin_ms * 1000)

    def on_queries(self, messages: Iterable[MessageLike], now: int) -> None:
        started = time.perf_counter()
        n = self.inputs.each(messages, now, self._intake, topics.QUERIES, "intake")
        if n:
            self.sensor.on_intake((time.perf_counter() - started) / n)

    def _intake(self, msg: MessageLike, now: int) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.offsets.read(topics.QUERIES, partition, offset)
        q = self.inputs.decode("Query", msg, topics.QUERIES, "intake")
        if q is None:
            return
        qid = q["query_id"]
        self.counts["queries"] += 1
        app = self.registry.app(q["app"])
        self.sensor.on_queries(q["app"] if app is not None else UNKNOWN, 1)
        if qid in self.pending or qid in self.emitted:
            # redelivered (clipstream.streams.worker.dedup): answered once already, or about to be
            self.counts["duplicates"] += 1
            self.offsets.done(topics.QUERIES, partition, offset)
            return
        reason = self._reject_reason(q, app)
        if reason is not None:
            self.emitter.dead_letter(
                topics.QUERIES, partition, offset, msg.key(), msg.value(), reason, "intake", qid
            )
            self.emitted.add(qid, now)
            record = merge.error_prediction(q, reason, now)
            self.emitter.prediction(record, partition, (topics.QUERIES, partition, offset))
            self.sensor.on_prediction(app_label(self.registry, q["app"]), "error", None, 0.0)
            return
        assert app is not None
        key = selection_key(q["app"], q["user"] if app["personalised"] else None)
        state = self.states.state_for(key, app)
        deadline_ms = q["deadline_ms"] if q["deadline_ms"] is not None else app["deadline_ms"]
        deadline_us = int(deadline_ms * 1000)
        start = self._deadline_start(q["sent_at_us"], msg, now)
        p = Pending(
            query_id=qid,
            app=q["app"],
            user=q["user"],
            key=key,
            partition=partition,
            offset=offset,
            sent_at_us=q["sent_at_us"],
            intake_us=now,
            # answer a little before the deadline, so the answer reaches the app by it
            deadline_us=start + deadline_us - min(self.emit_margin_us, deadline_us // 4),
            features=q["features"],
            probs={},
            learns=app["policy"] in LEARNING,
        )
        models = state.models
        cache = app["cache"]
        for index, prob in state.choose(self.rng):
            name = models[index]
            p.probs[name] = prob
            spec = self.registry.model(name)
            if spec is None:
                p.answers[name] = Answer(name, 0, None, None, [], f"model {name} not deployed")
                continue
            version = spec["version"]
            p.versions[name] = version
            if cache:
                hit = self.cache.get(self.cache.key(name, version, as_bytes(p.features)))
                self.sensor.on_cache(name, hit is not None)
                if hit is not None:
                    p.answers[name] = hit
                    continue
            if p.deadline_us <= now:
                # read after its deadline (the intake is behind): a model's answer would
                # come too late, so its row must not take a place in the model's queue
                continue
            self.dispatch.enqueue(name, version, spec, qid, now)
        if p.complete:
            self._emit(p, now)
        elif p.deadline_us <= now:
            self.sensor.on_deadline_miss(p.app)
            self._emit(p, now)
        else:
            self.pending.add(p)

    @staticmethod
    def _deadline_start(sent_us: int, msg: MessageLike, now: int) -> int:
        """When the query's deadline starts: the client's send time, unless the client's
        clock is off from the broker's by more than MAX_CLIENT_SKEW_US, then the broker's
        append time (the queries topic is created with LogAppendTime)."""
        kind, stamp_ms = msg.timestamp()
        if kind == TIMESTAMP_LOG_APPEND_TIME and stamp_ms > 0:
            appended = stamp_ms * 1000
            return sent_us if abs(appended - sent_us) <= MAX_CLIENT_SKEW_US else appended
        # no broker stamp: only a client clock ahead of ours can be caught
        return sent_us if sent_us <= now + MAX_CLIENT_SKEW_US else now

    def _reject_reason(self, q: dict[str, Any], app: Mapping[str, Any] | None) -> str | None:
        if app is None:
            return f"unknown app {q['app']!r}: register it with `clipstream app register`"
        features = q["features"]
        if not features and q["raw"] is None and q["text"] is None:
            return "query has no input: features, raw and text are all empty"
        problem = deadline_problem(q["deadline_ms"])
        if problem is not None:
            return problem
        dim = app["input_dim"]
        if dim is None:
            spec = self.registry.version_spec(app["models"][0])
            dim = spec["input_dim"] if spec else None
        if dim is not None and features and len(features) != dim:
            return f"expected {dim} features for app {q['app']!r}, got {len(features)}"
        return None


def as_bytes(features: list[float]) -> bytes:
    """A query's features as the prediction cache's key digests them."""
    return np.asarray(features, dtype="<f8").tobytes()
