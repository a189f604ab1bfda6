"""Property tests of the replica side: whatever a batch holds and however a model
misbehaves, ``Replica.serve_batch`` answers every row, with a label or a reason, in a
result the worker accepts; it never raises."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipstream.models import replica as replica_module
from clipstream.models.adapters import CallableAdapter, ModelAdapter, SklearnAdapter
from clipstream.models.control.registry import Registry
from clipstream.models.files import load_model, save_model
from clipstream.streams.wire import codec
from clipstream.streams.wire.config import Settings
from clipstream.streams.worker.answer_join import malformed_result as _malformed_result
from tests.integration import misbehaving_models as bad
from tests.unit.fuzz_counts import report_inputs, tried

pytestmark = pytest.mark.usefixtures("report_inputs")
__all__ = ["report_inputs"]

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Uniform(bad.DigitsShaped):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.uniform(X)


class NaNScores(bad.DigitsShaped):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.full((len(X), 10), np.nan)


ADAPTERS: dict[str, ModelAdapter] = {
    "sklearn-ok": SklearnAdapter(Uniform(), "m", 1),
    "sklearn-raises": SklearnAdapter(bad.Raising(), "m", 1),
    "sklearn-wrong-shape": SklearnAdapter(bad.WrongShape(), "m", 1),
    "sklearn-wrong-rows": SklearnAdapter(bad.WrongRows(), "m", 1),
    "sklearn-nan-scores": SklearnAdapter(NaNScores(), "m", 1),
    "callable-none": CallableAdapter(lambda X: None, "m", 1, classes=["a", "b"]),
    "callable-3d": CallableAdapter(lambda X: np.zeros((len(X), 2, 2)), "m", 1, ["a", "b"]),
    "callable-strings": CallableAdapter(lambda X: np.array(["x"] * len(X)), "m", 1),
    "callable-too-few": CallableAdapter(lambda X: np.zeros(max(0, len(X) - 1)), "m", 1),
    "callable-scalar": CallableAdapter(lambda X: 3.0, "m", 1),
    "callable-wrong-width": CallableAdapter(lambda X: np.zeros((len(X), 5)), "m", 1, ["a"]),
}


class StubFollower:
    """The replica's view of the registry, without a control topic."""

    def __init__(self, settings: Settings, **hooks: object) -> None:
        self.registry = Registry()

    def sync(self, timeout: float = 30.0) -> Registry:
        return self.registry

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return predicate()


@pytest.fixture(scope="module")
def replicas() -> Iterator[dict[str, replica_module.Replica]]:
    with mock.patch.object(replica_module, "ControlFollower", StubFollower):
        yield {
            name: replica_module.Replica(
                Settings(bootstrap="unused:1"), "m", replica_id="r", adapters={1: adapter}
            )
            for name, adapter in ADAPTERS.items()
        }


doubles = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def batches(draw: st.DrawFn) -> dict:
    n = draw(st.integers(0, 12))
    cols = draw(st.sampled_from([64, 64, 64, 0, 3, 65]))
    rows = draw(st.sampled_from([n, n, n, n + 1, max(0, n - 1)]))
    if draw(st.booleans()):
        values = draw(st.lists(doubles, min_size=rows * cols, max_size=rows * cols))
        inputs = np.asarray(values, dtype="<f8").tobytes()
    else:
        inputs = draw(st.binary(max_size=8 * rows * cols + 9))
    return {
        "batch_id": "b",
        "model": "m",
        "version": draw(st.sampled_from([1, 1, 1, 2, -5])),
        "reply_partition": 0,
        "query_ids": [f"q{i}" for i in range(n)],
        "rows": rows,
        "cols": cols,
        "inputs": inputs,
        "sent_at_us": draw(st.integers(0, 2**62)),
        "deadline_at_us": 0,
    }


@FUZZ
@given(batch=batches(), which=st.sampled_from(sorted(ADAPTERS)))
def test_every_row_gets_an_answer_or_a_reason(replicas, batch, which) -> None:
    tried("model batches")
    tried("model rows", len(batch["query_ids"]))
    result = replicas[which].serve_batch(batch)
    n = len(batch["query_ids"])
    assert result["query_ids"] == batch["query_ids"]
    assert len(result["labels"]) == n and len(result["errors"]) == n
    for label, error in zip(result["labels"], result["errors"], strict=True):
        assert (label is None) != (error is None), (label, error)
        assert error is None or len(error) > 10  # a reason, not a code
    assert _malformed_result(result) is None, "the worker must be able to join it"
    codec.decode("ModelBatchResult", codec.encode("ModelBatchResult", result))
    if which != "sklearn-ok" and which != "callable-strings" and which != "sklearn-nan-scores":
        assert all(label is None for label in result["labels"]), which
    if batch["version"] != 1:
        assert all("has no version" in e for e in result["errors"])


def test_the_misbehaving_models_give_clear_reasons(replicas) -> None:
    X = np.zeros((4, 64))
    batch = {
        "batch_id": "b",
        "model": "m",
        "version": 1,
        "reply_partition": 0,
        "query_ids": ["a", "b", "c", "d"],
        "rows": 4,
        "cols": 64,
        "inputs": X.tobytes(),
        "sent_at_us": 0,
        "deadline_at_us": 0,
    }
    reasons = {name: replicas[name].serve_batch(batch)["errors"][0] for name in ADAPTERS}
    assert reasons["sklearn-ok"] is None
    assert "RuntimeError: this model always fails" in reasons["sklearn-raises"]
    assert "returned shape (4, 3)" in reasons["sklearn-wrong-shape"]
    assert "5 answers for 4 rows" in reasons["sklearn-wrong-rows"]
    assert "3-D" in reasons["callable-3d"]


def test_trusted_types_are_explicit_for_custom_model_classes(tmp_path: Path) -> None:
    """A skops file of a class outside sklearn/numpy/scipy loads only when named."""
    path = save_model(bad.Raising(), tmp_path / "raising.skops")
    with pytest.raises(ValueError, match="not trusted"):
        load_model(path)
    loaded = load_model(path, trusted=[bad.type_name(bad.Raising)])
    assert isinstance(loaded, bad.Raising)
