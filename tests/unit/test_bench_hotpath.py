"""The hot-path changes made for the bench keep the pipeline's behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from streams import topics
from streams.config import Settings
from streams.pipeline import DictStateStore, Pipeline, RawQuery
from tests.unit.test_pipeline import RecordingProducer, answer_batches, make_registry, query


def pipeline(cache: bool) -> tuple[Pipeline, RecordingProducer]:
    registry = make_registry()
    registry.apps["app"]["cache"] = cache
    producer = RecordingProducer()
    pipe = Pipeline(
        Settings(bootstrap="unused:1"),
        registry,
        producer,
        DictStateStore(),
        rng=np.random.default_rng(0),
    )
    return pipe, producer


@pytest.mark.parametrize("cache", [True, False])
def test_answers_fill_the_cache_only_for_apps_that_use_it(cache: bool) -> None:
    pipe, producer = pipeline(cache)
    pipe.on_queries([RawQuery(query("a", [1.0, 2.0, 3.0]), b"app", 0, 0)])
    pipe.tick()
    assert answer_batches(pipe, producer) == 1
    pipe.on_queries([RawQuery(query("b", [1.0, 2.0, 3.0]), b"app", 0, 1)])
    pipe.tick()
    answer_batches(pipe, producer)
    preds = {p["query_id"]: p for p in producer.on(topics.PREDICTIONS, "Prediction")}
    assert set(preds) == {"a", "b"}
    assert len(pipe.cache) == (1 if cache else 0)
    assert preds["b"]["cache_hit"] is cache
    assert preds["b"]["label"] == "1"


def test_metrics_still_count_every_query_and_prediction() -> None:
    from streams import metrics

    before_q = metrics.QUERIES.labels("app")._value.get()
    e2e = metrics.E2E_LATENCY.labels("app")

    def observed() -> float:
        return sum(bucket.get() for bucket in e2e._buckets)

    before_e2e = observed()
    pipe, producer = pipeline(False)
    pipe.on_queries(
        [RawQuery(query(f"m{i}", [1.0, 2.0, float(i)]), b"app", 0, i) for i in range(3)]
    )
    pipe.tick()
    answer_batches(pipe, producer)
    assert metrics.QUERIES.labels("app")._value.get() == before_q + 3
    assert observed() == before_e2e + 3  # one end-to-end observation per prediction
    assert pipe.counts["predictions"] == 3
