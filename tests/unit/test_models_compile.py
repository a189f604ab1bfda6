"""``--compile onnx``: a scikit-learn model becomes its ONNX graph only when the graph
answers as the model does; otherwise the original is served and the reason given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.gaussian_process import GaussianProcessClassifier
from sklearn.linear_model import LogisticRegression

from clipstream.models.adapters import OnnxAdapter, SklearnAdapter
from clipstream.models.files import load_onnx, save_model
from clipstream.models.onnx_compile import compare, compile_onnx, sample_rows


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits(return_X_y=True)


@pytest.fixture(scope="module")
def logreg(digits, tmp_path_factory) -> Path:
    X, y = digits
    return save_model(
        LogisticRegression(max_iter=2000).fit(X, y), tmp_path_factory.mktemp("m") / "lr.skops"
    )


def test_a_model_whose_graph_answers_the_same_is_compiled(logreg, digits, tmp_path) -> None:
    X, y = digits
    sample = tmp_path / "rows.npy"
    np.save(sample, X[:200])
    done = compile_onnx(str(logreg), "skops", "predict_proba", 64, out_dir=tmp_path, sample=sample)
    assert done.compiled and done.fmt == "onnx", done.explanation
    assert "answers match on 200 rows" in done.explanation
    graph = OnnxAdapter(load_onnx(done.path), "lr", 1)
    accuracy = np.mean(np.array(graph.predict_batch(X).labels) == y.astype(str))
    assert accuracy > 0.95  # the graph is the trained model, answering on its own


def test_a_model_skl2onnx_cannot_convert_is_served_as_it_is(digits, tmp_path) -> None:
    X, y = digits
    path = save_model(GaussianProcessClassifier().fit(X[:60], y[:60]), tmp_path / "gp.skops")
    done = compile_onnx(str(path), "skops", "predict_proba", 64, out_dir=tmp_path)
    assert not done.compiled and done.path == str(path) and done.fmt == "skops"
    assert "skl2onnx could not convert GaussianProcessClassifier" in done.explanation
    assert done.explanation.endswith("serving the skops file")


@pytest.mark.parametrize(
    ("fmt", "method", "why"),
    [
        ("onnx", "predict_proba", "this one is onnx"),
        ("skops", "decision_function", "not decision_function"),
    ],
)
def test_what_cannot_be_compiled_says_why(logreg, tmp_path, fmt, method, why) -> None:
    done = compile_onnx(str(logreg), fmt, method, 64, out_dir=tmp_path)
    assert not done.compiled and why in done.explanation


def test_a_graph_that_answers_otherwise_is_refused(digits) -> None:
    """Two different models stand for a converter that got a model wrong."""
    X, y = digits
    lr = SklearnAdapter(LogisticRegression(max_iter=2000).fit(X, y), "a", 1)
    rf = SklearnAdapter(RandomForestClassifier(5, random_state=0).fit(X, y), "b", 1)
    differs = compare(lr, rf, X[:100])
    assert differs is not None and "differ" in differs
    assert compare(lr, lr, X[:100]) is None


def test_sample_rows_must_have_the_models_width(tmp_path) -> None:
    assert sample_rows(8).shape == (256, 8)
    bad = tmp_path / "rows.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"expected rows x 8 numbers, got shape \(2, 3\)"):
        sample_rows(8, bad)
