"""A replica written only from docs/replica-protocol.md (tests/integration/protocol_replica.py:
its own Kafka clients and the .avsc files, nothing imported from clipstream) serves an app
through a real worker: answers on the right partition, per-row errors for a version it
cannot serve, the version switch on deploy and rollback, dead letters for garbage."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer

from clipstream.models.control import registry
from clipstream.models.files import load_model, save_model, save_onnx
from clipstream.models.training import digits_split
from clipstream.streams.runtime.processes import spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import topics
from tests.conftest import wait_for
from tests.integration.helpers import collect, read_all, wait_until_serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("protocol_replica.py")
MODEL = "ext-logreg"


def test_the_replica_imports_nothing_of_clipstream() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"confluent_kafka", "fastavro", "numpy", "onnxruntime"}


def test_a_replica_written_from_the_protocol_serves_an_app(
    kafka_settings, digits_models, processes, tmp_path
) -> None:
    s = kafka_settings
    logreg = load_model(digits_models["digits-logreg"][0])
    onnx_file = save_onnx(logreg, tmp_path / "logreg.onnx", 64)
    registry.deploy_model(s, MODEL, str(onnx_file), fmt="onnx", input_dim=64, partitions=2)
    registry.register_app(s, "ext", [MODEL], deadline_ms=30_000, default_label="d")
    processes("worker", "worker")
    command = [sys.executable, str(SCRIPT), "--bootstrap", s.require_bootstrap()]
    replica = spawn(
        "protocol-replica",
        [*command, "--model", MODEL, "--schemas", str(ROOT / "schemas")],
        tmp_path / "logs",
    )
    try:
        client, reader = Client(s), PredictionReader(s)
        _, X, _, _ = digits_split()
        wait_until_serving(client, reader, "ext", X[0].tolist())

        asked = {client.send_query("ext", x.tolist()): i for i, x in enumerate(X[:80])}
        client.flush()
        got = collect(reader, set(asked), timeout=60)
        expected = logreg.predict(X[:80])
        assert set(got) == set(asked) and all(len(v) == 1 for v in got.values())
        answers = [got[q][0] for q in asked]
        odd = [a for a in answers if a["models"] != [f"{MODEL}@1"] or a["default"]]
        assert not odd, [(a["error"], a["models"], a["answers"]) for a in odd[:3]]
        same = sum(
            a["label"] == str(expected[i]) for a, i in zip(answers, asked.values(), strict=True)
        )
        assert same >= 79, same  # float32 inside the ONNX graph

        # v2 in a format this replica does not serve: every row gets the reason
        registry.deploy_model(s, MODEL, str(save_model(logreg, tmp_path / "v2.skops")))
        rows = iter(X[80:])

        def one() -> dict:
            qid = client.send_query("ext", next(rows).tolist())
            client.flush()
            return collect(reader, {qid}, timeout=30).get(qid, [{}])[0]

        refused: list[dict] = []
        wait_for(
            lambda: (
                refused.append(one())
                or "format skops is not served" in str(refused[-1].get("error"))
            ),
            60,
            f"version 2 to be refused (last: {refused[-1:]})",
        )
        assert refused[-1]["default"] and refused[-1]["label"] == "d"
        registry.rollback_model(s, MODEL)
        wait_for(lambda: one().get("models") == [f"{MODEL}@1"], 60, "the rollback to v1")

        # garbage on the requests topic: a dead letter with the reason, and it serves on
        producer = Producer(s.kafka())
        producer.produce(topics.model_requests(MODEL), b"not avro", b"junk")
        producer.flush(10)

        def dead_letter() -> dict | None:
            for letter in read_all(s, topics.DEADLETTER, "DeadLetter"):
                if letter["value"] == b"not avro" and letter["stage"] == "replica":
                    return letter
            return None

        letter = wait_for(dead_letter, 30, "the replica's dead letter")
        assert letter["source_topic"] == topics.model_requests(MODEL) and letter["reason"]
        assert one().get("models") == [f"{MODEL}@1"]
        assert replica.alive()
    finally:
        code = replica.stop()
        print(replica.log_tail(20))
    assert code == 0  # SIGTERM: flushed, closed, exited cleanly
