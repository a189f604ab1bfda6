from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression, LogisticRegression

from clipstream.models.adapters import CallableAdapter, SklearnAdapter
from clipstream.models.files import load_model, save_model
from clipstream.models.training import digits_split
from clipstream.models.validation import InputSpec, to_matrix, validate


@pytest.fixture(scope="module")
def logreg() -> LogisticRegression:
    X, _, y, _ = digits_split()
    return LogisticRegression(max_iter=300).fit(X / 16, y)


def test_batch_predict_matches_the_estimator(logreg) -> None:
    _, X, _, _ = digits_split()
    X = X[:50] / 16
    out = SklearnAdapter(logreg, "lr", 1).predict_batch(X)
    assert out.labels == [str(v) for v in logreg.predict(X)]
    np.testing.assert_allclose(out.scores, logreg.predict_proba(X))
    assert out.classes == [str(c) for c in logreg.classes_]
    assert out.errors == [None] * 50


def test_bad_rows_get_errors_and_good_rows_still_answer(logreg) -> None:
    _, X, _, _ = digits_split()
    X = X[:3] / 16
    X[1, 7] = np.nan
    out = SklearnAdapter(logreg, "lr", 1).predict_batch(X)
    assert out.errors[1] == "input contains NaN or inf" and out.labels[1] is None
    assert out.errors[0] is None and out.labels[0] == str(logreg.predict(X[:1])[0])
    wrong = SklearnAdapter(logreg, "lr", 1).predict_batch(np.zeros((2, 10)))
    assert wrong.errors == ["expected 64 features, got 10"] * 2


def test_a_model_that_raises_or_returns_the_wrong_shape_answers_with_errors() -> None:
    def boom(X):
        raise RuntimeError("kaput")

    out = CallableAdapter(boom, "b", classes=["a", "b"]).predict_batch(np.ones((3, 2)))
    assert all("kaput" in e for e in out.errors) and out.labels == [None] * 3
    short = CallableAdapter(lambda X: np.ones(len(X) - 1), "s").predict_batch(np.ones((3, 2)))
    assert all("2 answers for 3 rows" in e for e in short.errors)


def test_regressor_and_callable_outputs() -> None:
    X = np.arange(6, dtype=float).reshape(3, 2)
    reg = LinearRegression().fit(X, X.sum(axis=1))
    out = SklearnAdapter(reg, "r", 1, method="predict").predict_batch(X)
    np.testing.assert_allclose(out.scores[:, 0], X.sum(axis=1))
    assert out.classes == []
    scores = CallableAdapter(lambda X: np.c_[X[:, 0], X[:, 1]], "c", classes=["x", "y"])
    assert scores.predict_batch(X).labels == ["y", "y", "y"]
    with pytest.raises(ValueError, match="no decision_function"):
        SklearnAdapter(reg, "r", 1, method="decision_function")


class Untrusted:
    pass


def test_skops_round_trip_and_untrusted_types_are_refused(tmp_path: Path, logreg) -> None:
    path = save_model(logreg, tmp_path / "lr.skops")
    loaded = load_model(path)
    _, X, _, _ = digits_split()
    np.testing.assert_array_equal(loaded.predict(X / 16), logreg.predict(X / 16))
    bad = save_model({"model": logreg, "extra": Untrusted()}, tmp_path / "bad.skops")
    with pytest.raises(ValueError, match="Untrusted"):
        load_model(bad)
    name = f"{__name__}.Untrusted"
    assert isinstance(load_model(bad, trusted=[name])["extra"], Untrusted)


def test_pickle_needs_the_trust_flag(tmp_path: Path, logreg) -> None:
    path = tmp_path / "lr.pkl"
    path.write_bytes(pickle.dumps(logreg))
    with pytest.raises(PermissionError, match="trust"):
        load_model(path, format="pickle")
    assert load_model(path, format="pickle", trust_pickle=True).n_features_in_ == 64
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.skops")


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=6),
        max_size=8,
    ),
    dim=st.integers(min_value=1, max_value=5),
)
def test_validation_never_raises_and_marks_every_bad_row(rows, dim) -> None:
    X, reasons = to_matrix(rows, dim)
    ok, why = validate(X, InputSpec(dim=dim))
    for i, row in enumerate(rows):
        bad_len = len(row) != dim
        assert (reasons[i] is not None) == bad_len
        if not bad_len:
            assert ok[i] == bool(np.isfinite(row).all())
            assert (why[i] is None) == ok[i]
