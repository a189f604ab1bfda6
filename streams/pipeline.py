"""The worker's query path, free of Faust so that it can be driven and tested directly.

Queries come in as chunks of raw Kafka messages from one intake. For each query the
pipeline decodes it, consults the prediction cache, asks the selection state which models
to use, and adds the input to a per-model batcher; a batcher flushes one ModelBatch
message per batch. Model answers come back as ModelBatchResult messages, are joined per
query, and each query is emitted exactly once: when all its models answered, or at its
deadline with what arrived (a partial ensemble) or the app's default output.

A query's Kafka message is acknowledged only when its prediction has been delivered, so a
crashed worker's unanswered queries are read again by whichever worker takes over.
"""

from __future__ import annotations

import functools
import heapq
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from models.batching import AIMDController, Batcher, BatchWindow
from models.cache import PredictionCache
from models.registry import Registry
from selection import SelectionState, combine
from streams import codec, metrics, topics
from streams.config import Settings
from streams.limits import MAX_DEADLINE_MS

log = logging.getLogger("clipstream.pipeline")

# A query whose client clock is further off than this gets its deadline from the
# worker's intake time instead, so one skewed client cannot expire or pin its queries.
MAX_CLOCK_SKEW_US = 60_000_000
# A batch unanswered this long no longer holds one of its model's in-flight slots.
INFLIGHT_TIMEOUT_US = 10_000_000
# How often queued rows of queries already answered at their deadline are dropped.
PRUNE_INTERVAL_US = 50_000
#: metrics label for an app or model name that is not registered
UNKNOWN = "(unknown)"


def now_us() -> int:
    return time.time_ns() // 1000


class ProducerLike(Protocol):
    def produce(self, topic: str, value: bytes, key: bytes | None = ..., **kw: Any) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...


@dataclass(slots=True)
class RawQuery:
    """One message from clipstream.queries, with the way to acknowledge it."""

    value: bytes | None
    key: bytes | None
    partition: int
    offset: int
    ack: Callable[[], None] | None = None


@dataclass(slots=True)
class Answer:
    model: str
    version: int
    label: str | None
    scores: np.ndarray | None
    classes: list[str]
    error: str | None = None
    cache_hit: bool = False

    @property
    def score(self) -> float | None:
        if self.scores is None or self.scores.size == 0:
            return None
        if self.label is not None and self.classes:
            try:
                return float(self.scores[self.classes.index(self.label)])
            except ValueError:
                pass
        return float(np.max(self.scores))


@dataclass(slots=True)
class Pending:
    query_id: str
    app: str
    user: str | None
    key: str
    partition: int
    sent_at_us: int
    intake_us: int
    deadline_us: int
    probs: dict[str, float]
    versions: dict[str, int]
    features: list[float]
    ack: Callable[[], None] | None
    answers: dict[str, Answer] = field(default_factory=dict)
    done: bool = False


@dataclass(slots=True)
class Remembered:
    """What feedback for an emitted query needs: each model's answer and its probability."""

    key: str
    app: str
    labels: dict[str, str | None]
    probs: dict[str, float]
    at_us: int


def model_answers(prediction: Mapping[str, Any]) -> tuple[dict[str, str | None], dict[str, float]]:
    """Each consulted model's label (None where it failed) and probability, as a Prediction
    record carries them: what feedback needs to update the selection state."""
    answers = prediction["answers"]
    labels = {a["model"]: (a["label"] if a["error"] is None else None) for a in answers}
    return labels, {a["model"]: a["prob"] for a in answers}


class StateStore(Protocol):
    """Selection state per selection key (a Faust table in the worker, a dict in tests)."""

    def state_for(self, key: str, app: Mapping[str, Any]) -> SelectionState: ...


class DictStateStore:
    def __init__(self) -> None:
        self.states: dict[str, SelectionState] = {}

    def state_for(self, key: str, app: Mapping[str, Any]) -> SelectionState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = new_state(app)
        else:
            state.sync_models(list(app["models"]))
        return state


def new_state(app: Mapping[str, Any]) -> SelectionState:
    return SelectionState.new(
        policy=app["policy"], models=list(app["models"]), eta=app["eta"], gamma=app["gamma"]
    )


def selection_key(app: str, user: str | None) -> str:
    return app if not user else f"{app}|{user}"


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        producer: ProducerLike,
        states: StateStore,
        *,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.producer = producer
        self.states = states
        self.rng = rng or np.random.default_rng()
        self.pending: dict[str, Pending] = {}
        self._deadlines: list[tuple[int, str]] = []
        self.cache = PredictionCache(settings.cache_size)
        self.batchers: dict[tuple[str, int, int], Batcher] = {}
        self.controllers: dict[str, AIMDController] = {}
        self.inflight: dict[str, int] = {}
        # batch id -> (model, rows, sent at); insertion order is send order
        self._inflight_batches: OrderedDict[str, tuple[str, int, int]] = OrderedDict()
        #: live replicas per model (consumer-group members), kept current by the worker
        self.replicas: dict[str, int] = {}
        #: per model, a moving average of a batch's round trip (sent to answered), in us
        self.round_trip_us: dict[str, float] = {}
        self._next_prune_us = 0
        # recently emitted ids: a redelivered query or a late answer must not emit twice
        self.emitted: OrderedDict[str, None] = OrderedDict()
        self.memory: OrderedDict[str, Remembered] = OrderedDict()
        self.counts = {
            "queries": 0,
            "predictions": 0,
            "defaults": 0,
            "errors": 0,
            "dead_letters": 0,
            "duplicates": 0,
            "late_answers": 0,
            "hopeless_rows": 0,
        }

    # -- intake -------------------------------------------------------------------------

    def on_queries(self, raws: Iterable[RawQuery], now: int | None = None) -> None:
        now = now or now_us()
        for raw in raws:
            try:
                self._intake_one(raw, now)
            except Exception as exc:  # one query's failure must not stop the others
                log.exception("intake failed for a query")
                self.dead_letter(
                    topics.QUERIES, raw, f"internal error: {exc!r}", "intake", ack=raw.ack
                )
        self.tick(now_us())

    def _intake_one(self, raw: RawQuery, now: int) -> None:
        try:
            q = codec.decode("Query", raw.value)
        except codec.DecodeError as exc:
            self.dead_letter(topics.QUERIES, raw, str(exc), "intake", ack=raw.ack)
            return
        qid = q["query_id"]
        self.counts["queries"] += 1
        _child(metrics.QUERIES, self.app_label(q["app"])).inc()
        if qid in self.pending or qid in self.emitted:
            self.counts["duplicates"] += 1
            self._ack(raw.ack)
            return
        app = self.registry.app(q["app"])
        reason = self._reject_reason(q, app)
        if reason is not None:
            self.dead_letter(topics.QUERIES, raw, reason, "intake", query_id=qid)
            self._emit_error(q, raw, reason, now)
            return
        assert app is not None
        key = selection_key(q["app"], q["user"] if app["personalised"] else None)
        state = self.states.state_for(key, app)
        choice = state.choose(self.rng)
        sent = q["sent_at_us"]
        start = sent if abs(now - sent) < MAX_CLOCK_SKEW_US else now
        deadline_ms = q["deadline_ms"] if q["deadline_ms"] is not None else app["deadline_ms"]
        p = Pending(
            query_id=qid,
            app=q["app"],
            user=q["user"],
            key=key,
            partition=raw.partition,
            sent_at_us=sent,
            intake_us=now,
            deadline_us=start + int(deadline_ms * 1000),
            probs={},
            versions={},
            features=q["features"],
            ack=raw.ack,
        )
        for index, prob in choice:
            name = state.models[index]
            spec = self.registry.model(name)
            if spec is None:
                p.answers[name] = Answer(name, 0, None, None, [], f"model {name} not deployed")
                p.probs[name] = prob
                continue
            version = spec["version"]
            p.probs[name] = prob
            p.versions[name] = version
            if app["cache"]:
                hit = self.cache.get(self.cache.key(name, version, _as_bytes(q["features"])))
                metrics.CACHE.labels(name, "hit" if hit is not None else "miss").inc()
                if hit is not None:
                    p.answers[name] = hit
                    continue
            if p.deadline_us <= now:
                # read after its deadline (the intake is behind): a model's answer would
                # come too late, so its row must not take a place in the model's queue
                continue
            self._batcher(name, version, raw.partition, spec).add(qid, now)
        self.pending[qid] = p
        if len(p.answers) == len(p.probs):
            self._emit(p, now)
        elif p.deadline_us <= now:
            metrics.DEADLINE_MISSES.labels(p.app).inc()
            self._emit(p, now)
        else:
            heapq.heappush(self._deadlines, (p.deadline_us, qid))

    def _reject_reason(self, q: dict[str, Any], app: Mapping[str, Any] | None) -> str | None:
        if app is None:
            return f"unknown app {q['app']!r}: register it with `clipstream app register`"
        features = q["features"]
        if not features and q["raw"] is None and q["text"] is None:
            return "query has no input: features, raw and text are all empty"
        if q["deadline_ms"] is not None and not 0 < q["deadline_ms"] <= MAX_DEADLINE_MS:
            return f"deadline_ms must be in (0, {MAX_DEADLINE_MS}], got {q['deadline_ms']}"
        dim = app["input_dim"]
        if dim is None:
            spec = self.registry.version_spec(app["models"][0])
            dim = spec["input_dim"] if spec else None
        if dim is not None and features and len(features) != dim:
            return f"expected {dim} features for app {q['app']!r}, got {len(features)}"
        return None

    def _batcher(
        self, model: str, version: int, partition: int, spec: Mapping[str, Any]
    ) -> Batcher:
        slot = (model, version, partition)
        batcher = self.batchers.get(slot)
        if batcher is None:
            controller = self.controllers.get(model)
            if controller is None:
                controller = self.controllers[model] = AIMDController(
                    slo_us=spec["latency_slo_ms"] * 1000,
                    initial=min(32, spec["batch_max"]),
                    max_size=spec["batch_max"],
                )
            batcher = self.batchers[slot] = Batcher(
                controller, BatchWindow(max_wait_us=spec["batch_wait_ms"] * 1000)
            )
        return batcher

    # -- batches out --------------------------------------------------------------------

    def tick(self, now: int | None = None) -> int | None:
        """Flush due batches and expire due deadlines; returns when to tick next (us)."""
        now = now or now_us()
        self._expire_inflight(now)
        # Deadlines first: rows of queries answered with a default just now are pruned
        # below, and never sent to a model whose answer would come too late.
        while self._deadlines and self._deadlines[0][0] <= now:
            _, qid = heapq.heappop(self._deadlines)
            p = self.pending.get(qid)
            if p is not None and not p.done:
                metrics.DEADLINE_MISSES.labels(p.app).inc()
                self._emit(p, now)
        if now >= self._next_prune_us:
            self._next_prune_us = now + PRUNE_INTERVAL_US
            pending = self.pending
            for batcher in self.batchers.values():
                if batcher.pending:
                    batcher.retain(lambda qid: qid in pending)
        wake: int | None = None
        for (model, version, partition), batcher in self.batchers.items():
            while batcher.pending and self._may_send(model):
                # An idle model gets its rows at once. A busy one gets them when a batch is
                # full or the window ran out, and only while it has a free slot: rows wait
                # here, where they still batch, not in the model's Kafka queue.
                idle = self.inflight.get(model, 0) == 0
                items = batcher.flush() if idle else batcher.due(now)
                if not items:
                    break
                self._send_batch(model, version, partition, items, now)
            nxt = batcher.next_due_us
            if nxt is not None:
                wake = int(nxt) if wake is None else min(wake, int(nxt))
            metrics.QUEUE_DEPTH.labels(model).set(batcher.pending)
        if self._deadlines:
            first = self._deadlines[0][0]
            wake = first if wake is None else min(wake, first)
        self.producer.poll(0)
        metrics.PENDING.set(len(self.pending))
        return wake

    def _may_send(self, model: str) -> bool:
        # two batches per replica: one being computed, one on its way
        return self.inflight.get(model, 0) < 2 * max(1, self.replicas.get(model, 1))

    def _expire_inflight(self, now: int) -> None:
        """Forget batches whose answer never came (a replica died and its batch went to
        another worker's partition, or the answer was lost), so the slot is not held
        forever; their queries are answered at their deadline regardless."""
        timeout = INFLIGHT_TIMEOUT_US
        while self._inflight_batches:
            batch_id, (model, _, sent) = next(iter(self._inflight_batches.items()))
            if now - sent < timeout:
                break
            del self._inflight_batches[batch_id]
            self.inflight[model] = max(0, self.inflight.get(model, 0) - 1)

    def _release(self, batch_id: str) -> tuple[str, int, int] | None:
        """Free the slot of an answered batch: the slot of the model the batch was sent to,
        whatever model the answer names (a stray answer must not leak a slot)."""
        sent = self._inflight_batches.pop(batch_id, None)
        if sent is not None:
            self.inflight[sent[0]] = max(0, self.inflight.get(sent[0], 0) - 1)
        return sent

    def _send_batch(
        self, model: str, version: int, partition: int, qids: list[str], now: int
    ) -> None:
        qids = [q for q in qids if q in self.pending]
        trip = self.round_trip_us.get(model)
        if trip is not None and self.inflight.get(model, 0) > 0:
            # Overload: a busy model's queue is oldest first, so rows whose deadline comes
            # before a batch could return would use the model's time and still end as
            # defaults, starving the rows that can make it. An idle model gets every row
            # (and so keeps measuring its round trip).
            feasible = [q for q in qids if self.pending[q].deadline_us - now >= trip]
            if len(feasible) < len(qids):
                self.counts["hopeless_rows"] += len(qids) - len(feasible)
                _child(metrics.HOPELESS_ROWS, model).inc(len(qids) - len(feasible))
                qids = feasible
        if not qids:
            return
        # Without a known input dimension rows may differ in length: one matrix per width,
        # and the replica tells each row whether its width fits the model.
        width = len(self.pending[qids[0]].features)
        other = [q for q in qids if len(self.pending[q].features) != width]
        if other:
            qids = [q for q in qids if len(self.pending[q].features) == width]
            self._send_batch(model, version, partition, other, now)
        rows = [self.pending[q].features for q in qids]
        X = np.asarray(rows, dtype="<f8").reshape(len(qids), width)
        batch_id = uuid.uuid4().hex
        deadline = min(self.pending[q].deadline_us for q in qids)
        batch = {
            "batch_id": batch_id,
            "model": model,
            "version": version,
            "reply_partition": partition,
            "query_ids": qids,
            "rows": X.shape[0],
            "cols": X.shape[1] if X.ndim == 2 else 0,
            "inputs": X.tobytes(),
            "sent_at_us": now,
            "deadline_at_us": deadline,
        }
        self.producer.produce(
            topics.model_requests(model), codec.encode("ModelBatch", batch), batch_id.encode()
        )
        self.inflight[model] = self.inflight.get(model, 0) + 1
        self._inflight_batches[batch_id] = (model, len(qids), now)
        metrics.BATCH_SIZE.labels(model).observe(len(qids))

    # -- answers in ---------------------------------------------------------------------

    def on_result(self, value: bytes | None, partition: int = -1, offset: int = -1) -> None:
        now = now_us()
        try:
            result = codec.decode("ModelBatchResult", value)
        except codec.DecodeError as exc:
            self.dead_letter(
                topics.RESPONSES, RawQuery(value, None, partition, offset), str(exc), "merge"
            )
            return
        model = result["model"]
        malformed = _malformed_result(result)
        if malformed is not None:
            # its queries are answered at their deadline
            self._release(result["batch_id"])
            self.dead_letter(
                topics.RESPONSES, RawQuery(value, None, partition, offset), malformed, "merge"
            )
            return
        sent = self._release(result["batch_id"])
        if sent is not None and sent[0] == model:
            trip = float(now - sent[2])
            last = self.round_trip_us.get(model)
            self.round_trip_us[model] = trip if last is None else 0.8 * last + 0.2 * trip
            controller = self.controllers.get(model)
            if controller is not None:
                metrics.BATCH_MAX.labels(model).set(
                    controller.observe(sent[1], float(result["model_us"]))
                )
        metrics.STAGE_LATENCY.labels("model").observe(result["model_us"] / 1e6)
        classes = list(result["classes"])
        n = len(result["query_ids"])
        scores = (
            np.frombuffer(result["scores"], dtype="<f8").reshape(n, -1)
            if result["scores"] and n
            else None
        )
        for i, qid in enumerate(result["query_ids"]):
            row = scores[i] if scores is not None and scores.shape[1] else None
            answer = Answer(
                model, result["version"], result["labels"][i], row, classes, result["errors"][i]
            )
            p = self.pending.get(qid)
            if p is None or p.done or model not in p.probs or model in p.answers:
                # late, or from a model this query did not ask (a stray or forged answer)
                self.counts["late_answers"] += 1
                metrics.LATE_ANSWERS.labels(
                    model if self.registry.model(model) is not None else UNKNOWN
                ).inc()
                continue
            if answer.error is None and model in p.versions and self._caches(p.app):
                cached = Answer(
                    model, answer.version, answer.label, answer.scores, classes, None, True
                )
                self.cache.put(self.cache.key(model, answer.version, _as_bytes(p.features)), cached)
            p.answers[model] = answer
            if len(p.answers) == len(p.probs):
                self._emit(p, now)
        self.tick(now_us())

    # -- predictions out ----------------------------------------------------------------

    def _emit(self, p: Pending, now: int) -> None:
        p.done = True
        self.pending.pop(p.query_id, None)
        for model in p.probs:
            if model not in p.answers:  # a straggler: recorded, and a loss for learning
                p.answers[model] = Answer(
                    model, p.versions.get(model, 0), None, None, [], "no answer by the deadline"
                )
        answered = {m: a for m, a in p.answers.items() if a.error is None and a.label is not None}
        app = self.registry.app(p.app) or {}
        error = None
        default = False
        if answered:
            if len(answered) == 1:
                (a,) = answered.values()
                label, score = a.label, a.score
            else:
                names = list(answered)
                weights = np.array([p.probs[m] for m in names], dtype=float)
                merged = combine(
                    [answered[m].label for m in names],
                    [answered[m].scores for m in names],
                    [answered[m].classes for m in names],
                    weights,
                )
                label, score = merged.label, merged.confidence
            outcome = "model" if len(answered) == len(p.probs) else "partial"
            if all(a.cache_hit for a in answered.values()):
                outcome = "cache"
        else:
            label, score = app.get("default_label"), None
            default = True
            outcome = "default"
            errors = [a.error for a in p.answers.values() if a.error]
            if errors:
                error = "; ".join(sorted(set(errors)))
            elif p.answers:
                error = None
            self.counts["defaults"] += 1
            metrics.DEFAULTS.labels(p.app).inc()
        record = {
            "query_id": p.query_id,
            "app": p.app,
            "user": p.user,
            "label": label,
            "score": score,
            "models": [f"{m}@{a.version}" for m, a in answered.items()],
            "answers": [
                {
                    "model": m,
                    "version": a.version,
                    "label": a.label,
                    "score": a.score,
                    "prob": float(p.probs.get(m, 0.0)),
                    "error": a.error,
                    "cache_hit": a.cache_hit,
                }
                for m, a in p.answers.items()
            ],
            "cache_hit": bool(answered) and all(a.cache_hit for a in answered.values()),
            "default": default,
            "error": error,
            "sent_at_us": p.sent_at_us,
            "emitted_at_us": now,
            "worker_us": now - p.intake_us,
        }
        self.remember(p)
        self._produce_prediction(record, p.ack, now, partition=p.partition)
        metrics.PREDICTIONS.labels(p.app, outcome).inc()

    def _emit_error(self, q: dict[str, Any], raw: RawQuery, reason: str, now: int) -> None:
        self.counts["errors"] += 1
        record = {
            "query_id": q["query_id"],
            "app": q["app"],
            "user": q["user"],
            "label": None,
            "score": None,
            "models": [],
            "answers": [],
            "cache_hit": False,
            "default": False,
            "error": reason,
            "sent_at_us": q["sent_at_us"],
            "emitted_at_us": now,
            "worker_us": 0,
        }
        self._produce_prediction(record, raw.ack, now, outcome="error", partition=raw.partition)
        self._mark_emitted(q["query_id"])

    def _produce_prediction(
        self,
        record: dict[str, Any],
        ack: Callable[[], None] | None,
        now: int,
        outcome: str | None = None,
        partition: int = -1,
    ) -> None:
        value = codec.encode("Prediction", record)

        def delivered(err: Any, _msg: Any) -> None:
            if err is None:
                self._ack(ack)
            else:
                # Not acked: the query is read again after a restart rather than lost.
                log.error("prediction %s not delivered: %s", record["query_id"], err)

        # A prediction goes to its query's partition number (streams.dedup rebuilds the
        # emitted ids of a query partition from the same predictions partition), keyed by
        # its query id so that a reader waiting for some ids can skip the rest undecoded.
        where = {"partition": partition} if partition >= 0 else {}
        key = record["query_id"].encode()
        self.producer.produce(topics.PREDICTIONS, value, key, on_delivery=delivered, **where)
        self._mark_emitted(record["query_id"])
        self.counts["predictions"] += 1
        if outcome is not None:
            metrics.PREDICTIONS.labels(self.app_label(record["app"]), outcome).inc()
        sent = record["sent_at_us"]
        if sent and abs(now - sent) < MAX_CLOCK_SKEW_US:
            _child(metrics.E2E_LATENCY, self.app_label(record["app"])).observe(
                max(0, now - sent) / 1e6
            )
        _child(metrics.STAGE_LATENCY, "worker").observe(record["worker_us"] / 1e6)

    def _mark_emitted(self, qid: str) -> None:
        self.emitted[qid] = None
        if len(self.emitted) > self.settings.answer_memory:
            self.emitted.popitem(last=False)

    def remember(self, p: Pending) -> None:
        self._keep(
            p.query_id,
            Remembered(
                key=p.key,
                app=p.app,
                labels={m: (a.label if a.error is None else None) for m, a in p.answers.items()},
                probs=dict(p.probs),
                at_us=p.intake_us,
            ),
        )

    def _keep(self, qid: str, remembered: Remembered) -> None:
        """Add to the answer memory, oldest out beyond its bound."""
        self.memory[qid] = remembered
        if len(self.memory) > self.settings.answer_memory:
            self.memory.popitem(last=False)

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget the unanswered queries of these partitions without acknowledging them (the
        partitions' next owner reads them again); their late answers are ignored."""
        gone = [qid for qid, p in self.pending.items() if p.partition in partitions]
        for qid in gone:
            del self.pending[qid]
        return len(gone)

    def restore(self, qid: str, remembered: Remembered | None) -> None:
        """A prediction found on the predictions topic: never emit ``qid`` again, and keep
        its answers for its feedback (see streams.dedup)."""
        self._mark_emitted(qid)
        if remembered is not None:
            self._keep(qid, remembered)

    def recall(self, qid: str, now: int | None = None) -> Remembered | None:
        found = self.memory.get(qid)
        if found is None:
            return None
        if (now or now_us()) - found.at_us > self.settings.answer_ttl_s * 1e6:
            del self.memory[qid]
            return None
        return found

    # -- errors -------------------------------------------------------------------------

    def dead_letter(
        self,
        source: str,
        raw: RawQuery,
        reason: str,
        stage: str,
        query_id: str | None = None,
        ack: Callable[[], None] | None = None,
    ) -> None:
        """Record bad input with its original bytes; ``ack`` runs once the record is safe."""
        self.counts["dead_letters"] += 1
        metrics.DEAD_LETTERS.labels(stage).inc()
        record = {
            "source_topic": source,
            "partition": raw.partition,
            "offset": raw.offset,
            "key": raw.key,
            "value": raw.value,
            "reason": reason,
            "stage": stage,
            "query_id": query_id,
            "at_us": now_us(),
        }
        self.producer.produce(
            topics.DEADLETTER,
            codec.encode("DeadLetter", record),
            raw.key,
            on_delivery=lambda err, _msg: self._ack(ack) if err is None else None,
        )

    def app_label(self, app: str) -> str:
        """The metrics label for an app name from a message: names that are not registered
        share one label, so bad input cannot grow the metrics without bound."""
        return app if self.registry.app(app) is not None else UNKNOWN

    def _caches(self, app: str) -> bool:
        """Whether ``app`` uses the prediction cache (no point filling it otherwise)."""
        spec = self.registry.app(app)
        return bool(spec and spec["cache"])

    @staticmethod
    def _ack(ack: Callable[[], None] | None) -> None:
        if ack is not None:
            ack()


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


@functools.lru_cache(maxsize=4096)
def _child(metric: Any, *labels: str) -> Any:
    """A metric's labelled child, looked up once: ``labels()`` costs ~10 us per call, paid
    several times per query on the hot path otherwise."""
    return metric.labels(*labels)


def _as_bytes(features: list[float]) -> bytes:
    return np.asarray(features, dtype="<f8").tobytes()
