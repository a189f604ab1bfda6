"""``clipstream bench --suite batching|selection``: measured side by side in one run.

Suite ``batching`` (Clipper's adaptive batching gain, per model): throughput with batch
size 1 against adaptive (AIMD) batching, at the replica (batches written straight to the
model's requests topic) and end to end (queries through a worker and a replica). The models
are skops files, plus the first one converted to ONNX with skl2onnx and served by
onnxruntime (``<model>-onnx``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from rich.console import Console
from rich.table import Table

from clipstream.models.control import registry
from clipstream.models.files import load_model, save_onnx
from clipstream.models.training import digits_split, train_digits_models
from clipstream.streams.ops.demo import kafka
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import consume_ready

console = Console(stderr=True)


@contextlib.contextmanager
def running(children: list[Child]) -> Iterator[list[Child]]:
    try:
        yield children
    finally:
        for child in children:
            child.stop()


def replica_throughput(
    settings: Settings, model: str, X: np.ndarray, rows: int, batch: int, timeout: float = 300
) -> float:
    """Rows/s one replica serves when fed batches of ``batch`` rows through Kafka."""
    producer = Producer(settings.kafka(**{"linger.ms": 5}))
    reply = Consumer(settings.kafka(**{"group.id": f"bench-{uuid.uuid4().hex}"}))
    reply.assign([TopicPartition(topics.RESPONSES, 0, -1)])  # from the end
    reply.poll(0.5)
    pending: set[str] = set()
    start = time.perf_counter()
    for first in range(0, rows, batch):
        chunk = X[np.arange(first, min(first + batch, rows)) % len(X)]
        batch_id = uuid.uuid4().hex
        pending.add(batch_id)
        record = {
            "batch_id": batch_id,
            "model": model,
            "version": 1,
            "reply_partition": 0,
            "query_ids": [f"{batch_id}-{i}" for i in range(len(chunk))],
            "rows": len(chunk),
            "cols": chunk.shape[1],
            "inputs": np.ascontiguousarray(chunk, "<f8").tobytes(),
            "sent_at_us": time.time_ns() // 1000,
            "deadline_at_us": 0,
        }
        producer.produce(topics.model_requests(model), codec.encode("ModelBatch", record))
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for msg in consume_ready(reply, 1000, 0.2):
            if not msg.error():
                pending.discard(codec.decode("ModelBatchResult", msg.value())["batch_id"])
    elapsed = time.perf_counter() - start
    reply.close()
    if pending:
        raise TimeoutError(f"{len(pending)} batches unanswered")
    return rows / elapsed


def end_to_end_throughput(
    settings: Settings, app: str, X: np.ndarray, queries: int, timeout: float = 300
) -> float:
    """Queries/s through worker and replica for a burst of ``queries``."""
    client, reader = Client(settings), PredictionReader(settings)
    warm = client.send_query(app, X[0].tolist(), deadline_ms=120_000)
    client.flush()
    _wait_for(reader, {warm}, 120)
    start = time.perf_counter()
    ids = {
        client.send_query(app, X[i % len(X)].tolist(), deadline_ms=600_000) for i in range(queries)
    }
    client.flush()
    _wait_for(reader, ids, timeout)
    elapsed = time.perf_counter() - start
    reader.close()
    return queries / elapsed


def _wait_for(reader: PredictionReader, ids: set[str], timeout: float) -> None:
    left = set(ids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for record in reader.poll(0.2):
            left.discard(record["query_id"])
    if left:
        raise TimeoutError(f"{len(left)} of {len(ids)} queries unanswered")


def batching_suite(
    settings: Settings, workdir: Path, models: list[str], rows: int, queries: int
) -> list[dict[str, Any]]:
    trained = train_digits_models(workdir / "models", names=models)
    _, X, _, _ = digits_split()
    files = {m: (str(trained[m][0]), "skops") for m in models}
    onnx = save_onnx(load_model(trained[models[0]][0]), workdir / "models" / "model.onnx", 64)
    files[f"{models[0]}-onnx"] = (str(onnx), "onnx")
    logs = workdir / "logs"
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap()}
    results = []
    for model, (path, fmt) in files.items():
        one, adaptive = f"{model}-b1", f"{model}-adaptive"
        # the same file under two names: one limited to batches of 1, one adaptive
        registry.deploy_model(settings, one, path, fmt=fmt, input_dim=64, batch_max=1, partitions=1)
        registry.deploy_model(
            settings,
            adaptive,
            path,
            fmt=fmt,
            input_dim=64,
            batch_max=1024,
            latency_slo_ms=50,
            partitions=1,
        )
        registry.register_app(settings, f"bench-{one}", [one], deadline_ms=600_000, cache=False)
        registry.register_app(
            settings, f"bench-{adaptive}", [adaptive], deadline_ms=600_000, cache=False
        )
        row: dict[str, Any] = {"model": model, "format": fmt}
        with running(
            [spawn(f"replica-{one}", clipstream_command("replica", "--model", one), logs, env)]
        ):
            # replica level: the same replica fed batches of 1, then of 256
            replica_throughput(settings, one, X, 64, 1)  # warm-up: group join, model load
            row["replica_b1_rows_s"] = replica_throughput(settings, one, X, rows, 1)
            row["replica_b256_rows_s"] = replica_throughput(settings, one, X, rows * 4, 256)
        with running(
            [
                spawn("worker", clipstream_command("worker"), logs, env),
                spawn(f"replica-{one}", clipstream_command("replica", "--model", one), logs, env),
                spawn(
                    f"replica-{adaptive}",
                    clipstream_command("replica", "--model", adaptive),
                    logs,
                    env,
                ),
            ]
        ):
            row["e2e_b1_qps"] = end_to_end_throughput(settings, f"bench-{one}", X, queries)
            row["e2e_adaptive_qps"] = end_to_end_throughput(
                settings, f"bench-{adaptive}", X, queries
            )
        row["replica_gain"] = row["replica_b256_rows_s"] / row["replica_b1_rows_s"]
        row["e2e_gain"] = row["e2e_adaptive_qps"] / row["e2e_b1_qps"]
        results.append(row)
        console.print(row)
    return results


def selection_suite(workdir: Path, models: list[str], passes: int = 5) -> dict[str, Any]:
    """Exp4's accuracy against each single model, and the feedback Exp3 needs to settle,
    on the digits test stream (the selection code the worker runs, without Kafka: the
    answers are the models' own, so the figures are the live system's)."""
    from clipstream.selection import SelectionState, combine

    trained = train_digits_models(workdir / "models", names=models)
    from clipstream.models.files import load_model

    _, X, _, y = digits_split()
    truth = [str(v) for v in y]
    outputs = {}
    for name in models:
        estimator = load_model(trained[name][0])
        proba = estimator.predict_proba(X)
        classes = [str(c) for c in estimator.classes_]
        outputs[name] = (proba, classes, [classes[i] for i in proba.argmax(axis=1)])
    single = {
        m: sum(a == t for a, t in zip(outputs[m][2], truth, strict=True)) / len(truth)
        for m in models
    }
    rng = np.random.default_rng(0)
    exp4 = SelectionState.new("EXP4", models, eta=0.2)
    exp3 = SelectionState.new("EXP3", models, eta=0.1, gamma=0.05)
    best = max(single, key=single.get)
    correct4 = correct3 = 0
    settled_after = None
    order = np.concatenate([rng.permutation(len(truth)) for _ in range(passes)])
    for n, i in enumerate(order, start=1):
        weights = exp4.weights()
        merged = combine(
            [outputs[m][2][i] for m in models],
            [outputs[m][0][i] for m in models],
            [outputs[m][1] for m in models],
            np.array([weights[m] for m in models]),
        )
        correct4 += n <= len(truth) and merged.label == truth[i]
        exp4.learn({m: outputs[m][2][i] for m in models}, truth[i])
        [(arm, prob)] = exp3.choose(rng)
        chosen = models[arm]
        correct3 += n <= len(truth) and outputs[chosen][2][i] == truth[i]
        exp3.learn({chosen: outputs[chosen][2][i]}, truth[i], {chosen: prob})
        if settled_after is None and exp3.weights()[best] > 0.8:
            settled_after = n
    return {
        "models": models,
        "single_accuracy": single,
        "exp4_accuracy_first_pass": correct4 / len(truth),
        "exp3_accuracy_first_pass": correct3 / len(truth),
        "exp4_weights": exp4.weights(),
        "exp3_probabilities": exp3.weights(),
        "exp3_feedback_to_settle": settled_after,
        "best": best,
    }


def run_suite(suite: str, models: list[str], rows: int, queries: int, out: Path | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="clipstream-bench-"))
    if suite == "selection":
        figures = selection_suite(workdir, models)
        console.print(figures)
        if out is not None:
            out.write_text(json.dumps({"suite": suite, **figures}, indent=2))
        print(
            f"bench: suite=selection exp4_accuracy={figures['exp4_accuracy_first_pass']:.3f} "
            + " ".join(f"{m}={a:.3f}" for m, a in figures["single_accuracy"].items())
            + f" exp3_feedback_to_settle={figures['exp3_feedback_to_settle']}"
        )
        return 0
    if suite != "batching":
        raise ValueError(f"unknown suite {suite!r}")
    with kafka(Settings.from_env(), workdir) as settings:
        results = batching_suite(settings, workdir, models, rows, queries)
    table = Table(
        "model",
        "format",
        "replica b=1 rows/s",
        "replica b=256 rows/s",
        "gain",
        "e2e b=1 q/s",
        "e2e adaptive q/s",
        "gain",
    )
    for r in results:
        table.add_row(
            r["model"],
            r["format"],
            f"{r['replica_b1_rows_s']:.0f}",
            f"{r['replica_b256_rows_s']:.0f}",
            f"{r['replica_gain']:.1f}x",
            f"{r['e2e_b1_qps']:.0f}",
            f"{r['e2e_adaptive_qps']:.0f}",
            f"{r['e2e_gain']:.1f}x",
        )
    Console().print(table)
    if out is not None:
        out.write_text(json.dumps({"suite": suite, "results": results}, indent=2))
    for r in results:
        print(
            f"bench: suite=batching model={r['model']} format={r['format']} "
            f"replica_gain={r['replica_gain']:.1f} e2e_gain={r['e2e_gain']:.1f} "
            f"e2e_adaptive_qps={r['e2e_adaptive_qps']:.0f} e2e_b1_qps={r['e2e_b1_qps']:.0f}"
        )
    return 0
