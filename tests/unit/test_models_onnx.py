"""ONNX models served through the same batch interface as scikit-learn ones: converted with
skl2onnx or built as a bare graph (what another framework's export looks like), with labels,
class scores and per-row errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clipstream.models.adapters import OnnxAdapter, SklearnAdapter, adapter_for
from clipstream.models.files import load_model, save_onnx
from clipstream.models.training import digits_split


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.fixture(scope="module")
def fitted(digits):
    X, _, y, _ = digits
    return {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y),
        "forest": RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y),
    }


@pytest.mark.parametrize("name", ["logreg", "forest"])
def test_a_converted_model_answers_like_the_estimator(name, fitted, digits, tmp_path) -> None:
    estimator, X = fitted[name], digits[1]
    path = save_onnx(estimator, tmp_path / f"{name}.onnx", 64)
    adapter = adapter_for(load_model(path, format="onnx"), name, 1)
    assert isinstance(adapter, OnnxAdapter)
    out = adapter.predict_batch(X)
    reference = SklearnAdapter(estimator, name, 1).predict_batch(X)
    assert out.classes == reference.classes == [str(c) for c in estimator.classes_]
    assert out.errors == [None] * len(X)
    # float32 inside the graph: a near-tie may flip, nothing more
    agree = np.mean(np.array(out.labels) == np.array(reference.labels))
    assert agree > 0.99, agree
    np.testing.assert_allclose(out.scores, reference.scores, atol=1e-4)


def test_bad_rows_get_their_own_errors(fitted, digits, tmp_path) -> None:
    # skl2onnx's default output: one {class: score} map per row (ZipMap)
    estimator = fitted["logreg"]
    proto = to_onnx(estimator, digits[1][:1].astype(np.float32))
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(proto.SerializeToString())
    adapter = adapter_for(load_model(path, format="onnx"), "zm", 3)
    X = digits[1][:4].copy()
    X[1, 5] = np.nan
    X[2, 9] = 1e300  # finite, but not as float32
    out = adapter.predict_batch(X)
    assert out.errors[1] == "input contains NaN or inf"
    assert out.errors[2] == "input outside the model's float32 range"
    assert out.labels[1] is None and out.labels[2] is None
    expected = [str(v) for v in estimator.predict(X[[0, 3]])]
    assert [out.labels[0], out.labels[3]] == expected and out.errors[0] is out.errors[3] is None
    np.testing.assert_allclose(out.scores[0], estimator.predict_proba(X[:1])[0], atol=1e-4)
    assert not out.scores[2].any()
    wrong = adapter.predict_batch(np.zeros((2, 10)))
    assert wrong.errors == ["expected 64 features, got 10"] * 2


# what onnxruntime reads (the onnx package writes a newer IR version by default)
OPSET, IR = [helper.make_opsetid("", 17)], 10


def bare_graph(path, weights: np.ndarray, softmax: bool, classes: list[str] | None = None):
    """A graph as a PyTorch or TensorFlow export writes one: X @ W, maybe a softmax."""
    k = weights.shape[1]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Z"])]
    out = "Z"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["Z"], ["P"], axis=1))
        out = "P"
    graph = helper.make_graph(
        nodes,
        "bare",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, weights.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, k])],
        [helper.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=IR)
    if classes is not None:
        helper.set_model_props(model, {"classes": json.dumps(classes)})
    onnx.save(model, path)
    return path


def test_a_graph_from_another_framework(tmp_path) -> None:
    W = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3], [0, 0, 0]], dtype=np.float32)
    X = np.array([[5, 0, 0, 1], [0, 0, 1, 1], [0, 1, 0, 0]], dtype=np.float64)
    named = bare_graph(tmp_path / "named.onnx", W, True, ["cat", "dog", "eel"])
    out = adapter_for(load_model(named, format="onnx"), "n", 1).predict_batch(X)
    assert out.classes == ["cat", "dog", "eel"] and out.labels == ["cat", "eel", "dog"]
    np.testing.assert_allclose(out.scores.sum(axis=1), 1.0, rtol=1e-6)
    # no class names in the graph: scores are labelled by column
    plain = bare_graph(tmp_path / "plain.onnx", W, True)
    out = adapter_for(load_model(plain, format="onnx"), "p", 1).predict_batch(X)
    assert out.classes == ["0", "1", "2"] and out.labels == ["0", "2", "1"]
    # one output column and no classes: a regressor, one value per row
    reg = bare_graph(tmp_path / "reg.onnx", np.array([[1], [2], [3], [4]], np.float32), False)
    out = adapter_for(load_model(reg, format="onnx"), "r", 1).predict_batch(X)
    assert out.classes == [] and out.labels == ["9.0", "7.0", "2.0"]
    np.testing.assert_allclose(out.scores[:, 0], [9, 7, 2])


def test_a_converted_regressor_answers_values(tmp_path) -> None:
    X = np.arange(12, dtype=float).reshape(4, 3)
    reg = LinearRegression().fit(X, X @ [1.0, 2.0, 3.0])
    path = save_onnx(reg, tmp_path / "lr.onnx", 3)
    out = adapter_for(load_model(path, format="onnx"), "lr", 1).predict_batch(X)
    np.testing.assert_allclose(out.scores[:, 0], reg.predict(X), rtol=1e-5)
    assert out.classes == [] and out.errors == [None] * 4


def test_what_a_replica_cannot_serve_is_refused_with_the_reason(tmp_path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "ints",
        [helper.make_tensor_value_info("X", TensorProto.INT64, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, [None, 4])],
    )
    path = tmp_path / "ints.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=IR), path)
    with pytest.raises(ValueError, match="one float or double tensor"):
        adapter_for(load_model(path, format="onnx"), "i", 1)

    # a tensor kept in another file would make the replica read a path the file names
    W = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32).tobytes(), True)
    W.data_location = TensorProto.EXTERNAL
    W.ClearField("raw_data")
    W.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Z"])],
        "external",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None, 2])],
        [W],
    )
    path = tmp_path / "external.onnx"
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=IR)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="external files are not supported"):
        load_model(path, format="onnx")
    with pytest.raises(ValueError, match="unknown model format 'tf'"):
        load_model(path, format="tf")
