"""``clipstream model deploy --compile onnx`` as an operator runs it: the skops file of a
logistic regression is deployed as its ONNX graph, a replica serves the graph, and an
ensemble over it and a skops model answers queries, with and without users, as the
scikit-learn models do; a model skl2onnx cannot convert is deployed as it is."""

from __future__ import annotations

import numpy as np
import pytest

from clipstream.models.control import registry
from clipstream.models.files import load_model, save_model
from clipstream.models.training import digits_split
from clipstream.streams.sdk import Client, PredictionReader
from tests.integration.helpers import collect, run_cli, wait_until_serving

pytestmark = pytest.mark.integration


def test_a_compiled_model_serves_the_same_answers(kafka_settings, digits_models, processes):
    logreg, weak = digits_models["digits-logreg"][0], digits_models["digits-weak"][0]
    done = run_cli(
        kafka_settings, "model", "deploy", "lr", str(logreg), "--compile", "onnx",
        "--input-dim", "64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "compiled to ONNX: answers match on 256 rows" in done.stdout
    assert registry.current(kafka_settings).model("lr")["versions"][-1]["format"] == "onnx"
    registry.deploy_model(kafka_settings, "weak", str(weak), input_dim=64)
    registry.register_app(
        kafka_settings, "compiled", ["lr", "weak"], policy="EXP4", deadline_ms=5000
    )
    processes("worker", "worker")
    processes("replica-lr", "replica", "--model", "lr")
    processes("replica-weak", "replica", "--model", "weak")
    client, reader = Client(kafka_settings), PredictionReader(kafka_settings)
    try:
        wait_until_serving(client, reader, "compiled", np.zeros(64).tolist())
        _, X, _, _ = digits_split()
        rows = X[:60]
        sent = {
            client.send_query("compiled", row.tolist(), user=None if i % 2 else f"u{i % 4}"): i
            for i, row in enumerate(rows)
        }
        client.flush()
        got = collect(reader, set(sent), 60)
    finally:
        reader.close()
    assert set(got) == set(sent)
    expected = load_model(logreg).predict(rows).astype(str)
    for qid, i in sent.items():
        (prediction,) = got[qid]
        answers = {a["model"]: a for a in prediction["answers"]}
        assert set(answers) == {"lr", "weak"}, prediction  # the full ensemble answered
        assert answers["lr"]["label"] == expected[i]  # the graph answers as the model


def test_a_model_that_cannot_be_compiled_is_deployed_as_it_is(kafka_settings, tmp_path):
    from sklearn.gaussian_process import GaussianProcessClassifier

    X, _, y, _ = digits_split()
    path = save_model(GaussianProcessClassifier().fit(X[:60], y[:60]), tmp_path / "gp.skops")
    done = run_cli(kafka_settings, "model", "deploy", "gp", str(path), "--compile", "onnx")
    assert done.returncode == 0, done.stderr
    assert "not compiled: skl2onnx could not convert GaussianProcessClassifier" in done.stdout
    assert registry.current(kafka_settings).model("gp")["versions"][-1]["format"] == "skops"
