"""The worker's query path, free of Kafka's clients so that it can be driven and tested
directly: a chain of small stages, each with its own module.

    queries ─► intake (decode, validate, deadline) ─► cache ─► selection (StateView)
            ─► dispatch (per-model queue, batching policy, in-flight slots) ─► replicas
    answers ─► join per query ─► merge (ensemble, straggler, default) ─► emit
    feedback ─► join with the answer memory ─► observation for the key's owner (learning)

Every input message is marked done in ``Offsets`` only once what it caused is on Kafka
(worker.emit), and the serving loop commits from there (worker.serving). Deadlines and
batch windows fire from ``tick``, which says when it next needs to run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from clipstream.models.control.registry import Registry
from clipstream.selection import LEARNING, SelectionState, selection_key
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.limits import deadline_problem
from clipstream.streams.wire.sensors import UNKNOWN, Sensor
from clipstream.streams.worker import merge
from clipstream.streams.worker.answers import AnswerMemory, EmittedIds, Remembered
from clipstream.streams.worker.cache import PredictionCache
from clipstream.streams.worker.dispatch import Dispatcher
from clipstream.streams.worker.emit import Emitter, Source
from clipstream.streams.worker.offsets import Offsets
from clipstream.streams.worker.pending import Answer, Pending, PendingQueries

log = logging.getLogger("clipstream.pipeline")

# A client clock further off than this (against the broker's stamp of the query) is not
# trusted: the deadline starts when the broker took the query in.
MAX_CLIENT_SKEW_US = 50_000
# How often queued rows of queries already answered at their deadline are dropped.
PRUNE_INTERVAL_US = 50_000
TICK_REPORT_US = 1_000_000
TIMESTAMP_LOG_APPEND_TIME = 2  # confluent_kafka.TIMESTAMP_LOG_APPEND_TIME


class MessageLike(Protocol):
    """What the pipeline reads of a Kafka message (confluent_kafka.Message has it)."""

    def value(self) -> bytes | None: ...

    def key(self) -> bytes | None: ...

    def partition(self) -> int: ...

    def offset(self) -> int: ...

    def timestamp(self) -> tuple[int, int]: ...


class StateSource(Protocol):
    def state_for(self, key: str, app: Mapping[str, Any]) -> SelectionState: ...


class Pipeline:
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
        self.sensor = sensor or Sensor()
        self.rng = rng or np.random.default_rng()
        self.offsets = Offsets()
        self.pending = PendingQueries()
        self.dispatch = Dispatcher(
            producer,
            self.sensor,
            settings.inflight_per_replica,
            settings.batch_idle_wait_ms * 1000,
        )
        self.emitter = Emitter(producer, self.offsets, self.sensor)
        self.cache = PredictionCache(settings.cache_size)
        self.emitted = EmittedIds(settings.dedup_memory)
        self.memory = AnswerMemory(settings.answer_memory, settings.answer_ttl_s)
        self.emit_margin_us = int(settings.emit_margin_ms * 1000)
        #: partitions being handed over in a rebalance: nothing of theirs is emitted until
        #: they are assigned again (thaw) or given up (drop)
        self.frozen: set[int] = set()
        self._held: list[Pending] = []
        self._next_prune = 0
        self._next_report = 0
        self.counts = {"queries": 0, "duplicates": 0, "late_answers": 0, "defaults": 0}

    # -- intake -------------------------------------------------------------------------

    def on_queries(self, messages: Iterable[MessageLike], now: int) -> None:
        started = time.perf_counter()
        n = self._each(messages, now, self._intake, topics.QUERIES, "intake")
        if n:
            self.sensor.on_intake((time.perf_counter() - started) / n)

    def _each(
        self,
        messages: Iterable[MessageLike],
        now: int,
        handle: Callable[[MessageLike, int], None],
        topic: str,
        stage: str,
    ) -> int:
        """``handle`` each message; one message's failure must not stop the others (it is
        dead-lettered with the error). Returns how many there were."""
        n = 0
        for msg in messages:
            n += 1
            try:
                handle(msg, now)
            except Exception as exc:
                log.exception("%s failed for a message of %s", stage, topic)
                self._dead_letter(topic, msg, f"internal error: {exc!r}", stage)
        return n

    def _decode(self, kind: str, msg: MessageLike, topic: str, stage: str) -> Any | None:
        """The record a message holds; None (and a dead letter) if it holds none."""
        try:
            return codec.decode(kind, msg.value())
        except codec.DecodeError as exc:
            self._dead_letter(topic, msg, str(exc), stage)
            return None

    def _intake(self, msg: MessageLike, now: int) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.offsets.read(topics.QUERIES, partition, offset)
        q = self._decode("Query", msg, topics.QUERIES, "intake")
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
            self.emitted.add(qid)
            record = merge.error_prediction(q, reason, now)
            self.emitter.prediction(record, partition, (topics.QUERIES, partition, offset))
            self.sensor.on_prediction(self.app_label(q["app"]), "error", None, 0.0)
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
                hit = self.cache.get(self.cache.key(name, version, _as_bytes(p.features)))
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

    # -- answers in ---------------------------------------------------------------------

    def on_results(self, messages: Iterable[MessageLike], now: int) -> None:
        self._each(messages, now, self._result, topics.RESPONSES, "merge")

    def _result(self, msg: MessageLike, now: int) -> None:
        partition, offset = msg.partition(), msg.offset()
        # an answer needs nothing delivered: a worker taking over sends its own batches
        self.offsets.read(topics.RESPONSES, partition, offset)
        self.offsets.done(topics.RESPONSES, partition, offset)
        result = self._decode("ModelBatchResult", msg, topics.RESPONSES, "merge")
        if result is None:
            return
        model = result["model"]
        malformed = _malformed_result(result)
        if malformed is not None:
            self.dispatch.release(result["batch_id"])  # its queries end at their deadline
            self._dead_letter(topics.RESPONSES, msg, malformed, "merge")
            return
        self.dispatch.answered(result["batch_id"], model, float(result["model_us"]), now)
        classes = list(result["classes"])
        qids = result["query_ids"]
        n = len(qids)
        scores = (
            np.frombuffer(result["scores"], dtype="<f8").reshape(n, -1)
            if result["scores"] and n
            else None
        )
        if scores is not None and not scores.shape[1]:
            scores = None
        labels, errors, version = result["labels"], result["errors"], result["version"]
        pending, late = self.pending, 0
        for i, qid in enumerate(qids):
            p = pending.get(qid)
            if p is None or model not in p.probs or model in p.answers:
                late += 1  # after its deadline, or not asked of this model (stray, forged)
                continue
            answer = Answer(
                model,
                version,
                labels[i],
                None if scores is None else scores[i],
                classes,
                errors[i],
            )
            if answer.error is None and model in p.versions and self._caches(p.app):
                cached = Answer(model, version, answer.label, answer.scores, classes, None, True)
                self.cache.put(self.cache.key(model, version, _as_bytes(p.features)), cached)
            p.answers[model] = answer
            if p.complete and p.partition not in self.frozen:
                pending.pop(qid)
                self._emit(p, now)
        if late:
            self.counts["late_answers"] += late
            self.sensor.on_late_answers(
                model if self.registry.model(model) is not None else UNKNOWN, late
            )

    # -- feedback -----------------------------------------------------------------------

    def on_feedback(self, messages: Iterable[MessageLike], now: int) -> None:
        """Join each feedback record to its query's answers; the observations go out one
        message per observations partition (their owners fold them: learning.learner)."""
        made: dict[int, tuple[list[dict[str, Any]], list[Source]]] = {}

        def feedback(msg: MessageLike, now: int) -> None:
            self._feedback(msg, now, made)

        self._each(messages, now, feedback, topics.FEEDBACK, "feedback")
        observed: dict[str, int] = {}
        for partition, (records, sources) in made.items():
            self.emitter.observations(partition, records, sources)
            for record in records:
                observed[record["app"]] = observed.get(record["app"], 0) + 1
        for app_name, n in observed.items():
            self.sensor.on_feedback(app_name, "observed", n)

    def _feedback(
        self,
        msg: MessageLike,
        now: int,
        made: dict[int, tuple[list[dict[str, Any]], list[Source]]],
    ) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.offsets.read(topics.FEEDBACK, partition, offset)
        fb = self._decode("Feedback", msg, topics.FEEDBACK, "feedback")
        if fb is None:
            self.sensor.on_feedback(UNKNOWN, "invalid")
            return
        app = self.registry.app(fb["app"])
        remembered = self.memory.recall(fb["query_id"], now)
        reason = None
        if app is None:
            reason = f"feedback for unknown app {fb['app']!r}"
        elif fb["label"] is None and fb["reward"] is None:
            reason = "feedback carries neither a label nor a reward"
        elif fb["label"] is None and not 0.0 <= fb["reward"] <= 1.0:  # also NaN
            reason = f"reward must be a number in [0, 1], got {fb['reward']}"
        elif app["policy"] not in LEARNING and fb["query_id"] in self.emitted:
            # nothing to learn for a single-model app: accepted, and done
            self.sensor.on_feedback(fb["app"], "ignored")
            self.offsets.done(topics.FEEDBACK, partition, offset)
            return
        elif remembered is None:
            reason = (
                f"feedback for unknown or expired query {fb['query_id']!r} (feedback must be "
                "keyed by its query's id, like the query, to reach the worker that answered it)"
            )
        elif fb["app"] != remembered.app:  # else it would reshape another app's state
            reason = (
                f"feedback names app {fb['app']!r}; query {fb['query_id']!r} was for app "
                f"{remembered.app!r}"
            )
        if reason is not None:
            self.sensor.on_feedback(self.app_label(fb["app"]), "rejected")
            self._dead_letter(topics.FEEDBACK, msg, reason, "feedback", fb["query_id"])
            return
        assert remembered is not None
        observation = {
            "key": remembered.key,
            "app": remembered.app,
            "query_id": fb["query_id"],
            "user": remembered.key[len(remembered.app) + 1 :] or None,
            "answers": [
                {"model": m, "label": label, "prob": remembered.probs.get(m, 0.0)}
                for m, label in remembered.labels.items()
            ],
            "label": fb["label"],
            "reward": fb["reward"],
            "feedback_partition": partition,
            "feedback_offset": offset,
            "at_us": now,
        }
        to = topics.partition_for(remembered.key, self.settings.partitions)
        records, sources = made.setdefault(to, ([], []))
        records.append(observation)
        sources.append((topics.FEEDBACK, partition, offset))

    # -- time ---------------------------------------------------------------------------

    def tick(self, now: int) -> int | None:
        """Answer queries whose deadline passed and send due batches; returns when to tick
        next (us since the epoch), or None when nothing waits."""
        for p in self.pending.expired(now):
            if p.partition in self.frozen:
                self._held.append(p)
                continue
            self.sensor.on_deadline_miss(p.app)
            self._emit(p, now)
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

    # -- predictions out ----------------------------------------------------------------

    def _emit(self, p: Pending, now: int) -> None:
        record, outcome = merge.prediction(p, self.registry.app(p.app), now)
        self.emitted.add(p.query_id)
        if p.learns:
            self.memory.keep(
                p.query_id,
                Remembered(
                    p.key,
                    p.app,
                    {m: (a.label if a.error is None else None) for m, a in p.answers.items()},
                    dict(p.probs),
                    p.intake_us,
                ),
            )
        if outcome == "default":
            self.counts["defaults"] += 1
        self.emitter.prediction(record, p.partition, (topics.QUERIES, p.partition, p.offset))
        sent = p.sent_at_us
        self.sensor.on_prediction(
            p.app,
            outcome,
            (now - sent) / 1e6 if sent and abs(now - sent) < 60_000_000 else None,
            (now - p.intake_us) / 1e6,
        )

    def _dead_letter(
        self,
        source: str,
        msg: MessageLike,
        reason: str,
        stage: str,
        query_id: str | None = None,
    ) -> None:
        """Bad input: dead-lettered with its bytes, and done once that is delivered."""
        partition, offset = msg.partition(), msg.offset()
        self.emitter.dead_letter(
            source,
            partition,
            offset,
            msg.key(),
            msg.value(),
            reason,
            stage,
            query_id,
            done=(source, partition, offset),
        )

    # -- partitions moving --------------------------------------------------------------

    def freeze(self, partitions: set[int]) -> None:
        """Partitions revoked in a rebalance: hold their predictions until they are either
        assigned here again or given up (another worker may answer them meanwhile)."""
        self.frozen |= partitions

    def thaw(self, partitions: set[int], now: int) -> None:
        """Frozen partitions assigned here again: emit what they held."""
        self.frozen -= partitions
        held = [p for p in self._held if p.partition in partitions]
        self._held = [p for p in self._held if p.partition not in partitions]
        for p in held:
            self.sensor.on_deadline_miss(p.app)
            self._emit(p, now)
        for p in self.pending.values():
            if p.partition in partitions and p.complete:
                self.pending.pop(p.query_id)
                self._emit(p, now)

    def drop(self, partitions: set[int]) -> int:
        """Partitions given up: forget their unanswered queries without marking them done
        (their next owner reads them again); their late answers are ignored."""
        self.frozen -= partitions
        gone = [p for p in self.pending.values() if p.partition in partitions]
        for p in gone:
            self.pending.pop(p.query_id)
        dropped = len(gone) + sum(p.partition in partitions for p in self._held)
        self._held = [p for p in self._held if p.partition not in partitions]
        self.offsets.forget(
            (topic, p)
            for topic in (topics.QUERIES, topics.FEEDBACK, topics.RESPONSES, topics.OBSERVATIONS)
            for p in partitions
        )
        return dropped

    def restore(self, found: list[tuple[str, Remembered | None]]) -> None:
        """Predictions read back from the predictions topic (worker.dedup), oldest first:
        never answer these ids again, and keep the answers feedback needs."""
        self.emitted.restore(qid for qid, _ in found)
        self.memory.restore([(qid, r) for qid, r in found if r is not None and self._learns(r.app)])

    # -- helpers ------------------------------------------------------------------------

    def app_label(self, app: str) -> str:
        """The metrics label for an app name from a message: names that are not registered
        share one label, so bad input cannot grow the metrics without bound."""
        return app if self.registry.app(app) is not None else UNKNOWN

    def _caches(self, app: str) -> bool:
        spec = self.registry.app(app)
        return bool(spec and spec["cache"])

    def _learns(self, app: str) -> bool:
        spec = self.registry.app(app)
        return bool(spec and spec["policy"] in LEARNING)


def _malformed_result(result: Mapping[str, Any]) -> str | None:
    """Why a decoded ModelBatchResult cannot be joined to its queries, or None."""
    n = len(result["query_ids"])
    if len(result["labels"]) != n or len(result["errors"]) != n:
        return (
            f"malformed ModelBatchResult from {result['model']}: {n} query ids, "
            f"{len(result['labels'])} labels, {len(result['errors'])} errors"
        )
    size = len(result["scores"])
    if size % 8 or (n and (size // 8) % n) or (size and not n):
        return (
            f"malformed ModelBatchResult from {result['model']}: {size} bytes of scores, {n} rows"
        )
    return None


def _as_bytes(features: list[float]) -> bytes:
    return np.asarray(features, dtype="<f8").tobytes()
