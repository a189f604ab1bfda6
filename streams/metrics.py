"""Prometheus metrics served by every clipstream process.

One module so that names stay consistent between the worker, the replicas and the
dashboard that queries them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
    ["stage"],  # intake | queue | model | merge | worker
    buckets=LATENCY_BUCKETS,
)
CACHE = Counter("clipstream_cache_total", "Prediction cache look-ups", ["model", "result"])
DEADLINE_MISSES = Counter(
    "clipstream_deadline_misses_total",
    "Queries whose models had not all answered by the deadline",
    ["app"],
)
DEFAULTS = Counter("clipstream_default_outputs_total", "Default outputs emitted", ["app"])
DEAD_LETTERS = Counter("clipstream_dead_letters_total", "Dead-letter records", ["stage"])
# every process that follows the control topic (models.registry)
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
    "clipstream_bandit_weight", "Selection weight per app and model", ["app", "model"]
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


def serve(port: int) -> int:
    """Serve /metrics on port (0 picks a free one); returns the port."""
    server, _ = start_http_server(port)
    return server.server_port
