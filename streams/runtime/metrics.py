"""Prometheus metrics served by every clipstream process.

One module so that names stay consistent between the worker, the replicas and the
dashboard that queries them."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from clipstream.streams.wire.sensors import Sensor

# Latency buckets from 100 us to 10 s: a cache hit and a timed-out ensemble on one axis.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# worker
QUERIES = Counter("clipstream_queries_total", "Queries taken in by the worker", ["app"])
PREDICTIONS = Counter(
    "clipstream_predictions_total", "Predictions emitted", ["app", "outcome"]
)  # outcome: model | partial | default | error | cache
E2E_LATENCY = Histogram(
    "clipstream_end_to_end_seconds",
    "Query send time to prediction emit time",
    ["app"],
    buckets=LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "clipstream_stage_seconds",
    "Time spent per stage inside the worker",
    ["stage"],  # intake | model | worker | restore
    buckets=LATENCY_BUCKETS,
)
STATE_STALENESS = Histogram(
    "clipstream_selection_state_staleness_seconds",
    "Time from a selection state's write by its owner to this worker reading it",
    buckets=LATENCY_BUCKETS,
)
DELIVERY_FAILURES = Counter(
    "clipstream_delivery_failures_total",
    "Produces Kafka refused, by topic and what was done (retried | dead_lettered | stopped)",
    ["topic", "action"],
)
COMMIT_FAILURES = Counter(
    "clipstream_commit_failures_total",
    "Commits of consumed offsets the broker did not take (the next commit retries them)",
)
CACHE = Counter("clipstream_cache_total", "Prediction cache look-ups", ["model", "result"])
DEADLINE_MISSES = Counter(
    "clipstream_deadline_misses_total",
    "Queries whose models had not all answered by the deadline",
    ["app"],
)
DEFAULTS = Counter("clipstream_default_outputs_total", "Default outputs emitted", ["app"])
DEAD_LETTERS = Counter("clipstream_dead_letters_total", "Dead-letter records", ["stage"])
# every process that follows the control topic (clipstream.models.control.registry, through Sensor)
CONTROL_REFUSED = Counter(
    "clipstream_control_refused_total",
    "Control records refused as invalid (the last good spec stays)",
    ["kind"],  # model | app | undecodable
)
PENDING = Gauge("clipstream_pending_queries", "Queries waiting for model answers")
BATCH_SIZE = Histogram(
    "clipstream_batch_size", "Rows per batch sent to a model", ["model"], buckets=BATCH_BUCKETS
)
BATCH_MAX = Gauge("clipstream_batch_max", "Current AIMD batch-size limit", ["model"])
QUEUE_DEPTH = Gauge("clipstream_batcher_queue_depth", "Rows waiting in a batcher", ["model"])
HOPELESS_ROWS = Counter(
    "clipstream_hopeless_rows_total",
    "Rows not sent to a busy model because its answer could not come before the deadline",
    ["model"],
)
LATE_ANSWERS = Counter(
    "clipstream_late_answers_total",
    "Model answers that arrived after their query was emitted",
    ["model"],
)
FEEDBACK = Counter("clipstream_feedback_total", "Feedback records", ["app", "result"])
BANDIT_WEIGHT = Gauge(
    "clipstream_bandit_weight",
    "Selection weight per model of a non-personalised app (personalised apps keep one state "
    "per user, too many for labels)",
    ["app", "model"],
)

# replica
REPLICA_ROWS = Counter("clipstream_replica_rows_total", "Rows predicted", ["model", "version"])
REPLICA_BATCHES = Counter("clipstream_replica_batches_total", "Batches served", ["model"])
REPLICA_ERRORS = Counter(
    "clipstream_replica_row_errors_total", "Rows answered with an error", ["model"]
)
REPLICA_BATCH_SIZE = Histogram(
    "clipstream_replica_batch_size",
    "Rows per batch at the replica",
    ["model"],
    buckets=BATCH_BUCKETS,
)
REPLICA_MODEL_LATENCY = Histogram(
    "clipstream_replica_model_seconds",
    "Model compute time per batch",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
REPLICA_QUEUE_LATENCY = Histogram(
    "clipstream_replica_queue_seconds",
    "Batch send to replica start",
    ["model"],
    buckets=LATENCY_BUCKETS,
)


@lru_cache(maxsize=8192)
def _child(metric: Any, *labels: str) -> Any:
    """A metric's labelled child, looked up once: ``labels()`` costs ~10 us per call."""
    return metric.labels(*labels)


class Prometheus(Sensor):
    """The worker's sensor hooks as Prometheus series."""

    def on_queries(self, app: str, n: int) -> None:
        _child(QUERIES, app).inc(n)

    def on_control_refused(self, kind: str) -> None:
        CONTROL_REFUSED.labels(kind).inc()

    def on_intake(self, seconds_per_query: float) -> None:
        _child(STAGE_LATENCY, "intake").observe(seconds_per_query)

    def on_cache(self, model: str, hit: bool) -> None:
        _child(CACHE, model, "hit" if hit else "miss").inc()

    def on_prediction(
        self, app: str, outcome: str, end_to_end_s: float | None, worker_s: float
    ) -> None:
        _child(PREDICTIONS, app, outcome).inc()
        if outcome == "default":
            _child(DEFAULTS, app).inc()
        if end_to_end_s is not None:
            _child(E2E_LATENCY, app).observe(end_to_end_s)
        _child(STAGE_LATENCY, "worker").observe(worker_s)

    def on_deadline_miss(self, app: str) -> None:
        _child(DEADLINE_MISSES, app).inc()

    def on_dead_letter(self, stage: str) -> None:
        _child(DEAD_LETTERS, stage).inc()

    def on_delivery_failed(self, topic: str, action: str) -> None:
        _child(DELIVERY_FAILURES, topic, action).inc()

    def on_commit_failed(self) -> None:
        COMMIT_FAILURES.inc()

    def on_batch_sent(self, model: str, rows: int) -> None:
        _child(BATCH_SIZE, model).observe(rows)

    def on_batch_answered(self, model: str, model_s: float, batch_max: int) -> None:
        _child(STAGE_LATENCY, "model").observe(model_s)
        _child(BATCH_MAX, model).set(batch_max)

    def on_late_answers(self, model: str, n: int) -> None:
        _child(LATE_ANSWERS, model).inc(n)

    def on_hopeless_rows(self, model: str, n: int) -> None:
        _child(HOPELESS_ROWS, model).inc(n)

    def on_tick(self, pending: int, queued: Mapping[str, int]) -> None:
        PENDING.set(pending)
        for model, rows in queued.items():
            _child(QUEUE_DEPTH, model).set(rows)

    def on_feedback(self, app: str, result: str, n: int = 1) -> None:
        _child(FEEDBACK, app, result).inc(n)

    def on_weights(self, app: str, weights: Mapping[str, float]) -> None:
        for model, weight in weights.items():
            _child(BANDIT_WEIGHT, app, model).set(weight)

    def on_state_staleness(self, seconds: float) -> None:
        STATE_STALENESS.observe(seconds)

    def on_restore(self, seconds: float) -> None:
        _child(STAGE_LATENCY, "restore").observe(seconds)


def serve(port: int) -> int:
    """Serve /metrics on port (0 picks a free one); returns the port."""
    server, _ = start_http_server(port)
    return server.server_port
