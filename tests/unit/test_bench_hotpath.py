"""The hot path's shortcuts keep the pipeline's behaviour: the cache is filled only for
apps that use it, metrics come through the sensor hooks (the processing code never
imports a metrics library), and every query and prediction is still counted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clipstream.streams.runtime import metrics
from clipstream.streams.wire import topics
from clipstream.streams.wire.clock import now_us
from tests.unit.fakes import answer_batches, make_pipeline, make_registry, query


@pytest.mark.parametrize("cache", [True, False])
def test_answers_fill_the_cache_only_for_apps_that_use_it(cache: bool) -> None:
    registry = make_registry()
    registry.apps["app"]["cache"] = cache
    pipe, producer = make_pipeline(registry)
    pipe.on_queries([query("a", deadline_ms=60_000)], now_us())
    pipe.tick(now_us())
    assert answer_batches(pipe, producer) == 1
    pipe.on_queries([query("b", offset=1, deadline_ms=60_000)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    preds = {p["query_id"]: p for p in producer.on(topics.PREDICTIONS, "Prediction")}
    assert set(preds) == {"a", "b"}
    assert len(pipe.cache) == (1 if cache else 0)
    assert preds["b"]["cache_hit"] is cache
    assert preds["b"]["label"] == "1"


def test_the_prometheus_sensor_counts_every_query_and_prediction() -> None:
    before_q = metrics.QUERIES.labels("app")._value.get()
    e2e = metrics.E2E_LATENCY.labels("app")

    def observed() -> float:
        return sum(bucket.get() for bucket in e2e._buckets)

    before_e2e = observed()
    pipe, producer = make_pipeline(sensor=metrics.Prometheus())
    pipe.on_queries(
        [query(f"m{i}", [1.0, 2.0, float(i)], offset=i, deadline_ms=60_000) for i in range(3)],
        now_us(),
    )
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    assert metrics.QUERIES.labels("app")._value.get() == before_q + 3
    assert observed() == before_e2e + 3  # one end-to-end observation per prediction
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 3


def test_the_query_path_never_imports_a_metrics_library() -> None:
    code = (
        "import sys, clipstream.streams.worker.pipeline, clipstream.streams.worker.serving; "
        "import clipstream.streams.learning.learner; "
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
