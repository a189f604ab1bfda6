"""``clipstream bench --suite batching`` on the test broker: every model, and an ONNX
conversion of the first one, measured at batch size 1 and adaptively, with the gain
reported. Asserts what the run must produce, not how fast (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from clipstream.streams.bench.report import parse_summary
from clipstream.streams.runtime.processes import clipstream_command
from clipstream.streams.wire.config import Settings

pytestmark = pytest.mark.integration


def test_batching_suite_includes_an_onnx_model(kafka_settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    args = clipstream_command(
        "bench",
        "--suite",
        "batching",
        "--models",
        "digits-logreg",
        "--rows",
        "64",
        "--queries",
        "64",
        "--out",
        str(out),
    )
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap()}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    results = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert {m: r["format"] for m, r in results.items()} == {
        "digits-logreg": "skops",
        "digits-logreg-onnx": "onnx",
    }
    for r in results.values():
        for figure in (
            "replica_b1_rows_s",
            "replica_b256_rows_s",
            "e2e_b1_qps",
            "e2e_adaptive_qps",
        ):
            assert r[figure] > 0, (r["model"], figure)
        assert r["replica_gain"] == pytest.approx(r["replica_b256_rows_s"] / r["replica_b1_rows_s"])
        assert r["e2e_gain"] == pytest.approx(r["e2e_adaptive_qps"] / r["e2e_b1_qps"])
    lines = [parse_summary(line) for line in done.stdout.splitlines() if line.startswith("bench:")]
    assert [(s["model"], s["format"]) for s in lines] == [
        ("digits-logreg", "skops"),
        ("digits-logreg-onnx", "onnx"),
    ]
