"""Smoke run of ``clipstream bench`` on the test broker: every system for a few seconds.

Asserts what the run must produce, never how fast anything was (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from streams.bench import peer
from streams.bench.report import parse_summary
from streams.config import Settings
from streams.processes import clipstream_command

pytestmark = pytest.mark.integration

FIGURES = (
    "sent",
    "received",
    "throughput_qps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "deadline_misses",
    "defaults",
    "errors",
    "lost",
    "histogram",
)


def test_bench_runs_every_system_side_by_side(kafka_settings: Settings, tmp_path: Path) -> None:
    # the peer joins only if its virtualenv is already there: creating it takes minutes
    systems = ["floor", "naive", "clipstream", "clipstream-cache"]
    if peer.installed():
        systems.append("peer")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = clipstream_command(
        "bench",
        "--systems",
        ",".join(systems),
        "--rate",
        "200",  # light load covers the rows the burst sends: the cached app can hit
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--burst",
        "200",
        "--broker-warmup",
        "0",
        "--out",
        str(out),
        "--plot",
        str(png),
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(kafka_settings.partitions),
    }
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    figures = json.loads(out.read_text())
    assert set(figures["systems"]) == set(systems), figures["skipped"]
    for name, f in figures["systems"].items():
        for phase in ("light", "capacity"):
            run = f[phase]
            missing = [k for k in FIGURES if k not in run]
            assert not missing, (name, phase, missing)
            assert run["lost"] == 0, (name, phase)
            assert run["received"] == run["sent"] > 0, (name, phase)
            assert sum(run["histogram"]["counts"]) == run["received"], (name, phase)
            assert run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"]
    # the cached app answers the repeated test rows from the cache
    assert figures["systems"]["clipstream-cache"]["cache_hit_rate"] > 0.5

    summary = parse_summary(done.stdout.strip().splitlines()[-1])
    cap = {n: f["capacity"]["throughput_qps"] for n, f in figures["systems"].items()}
    p50 = {n: f["light"]["p50_ms"] for n, f in figures["systems"].items()}
    assert summary["system"] == "clipstream"
    assert summary["lost"] == "0"
    # the summary prints ratios to two decimals, hence the absolute tolerance
    assert float(summary["speedup_vs_naive"]) == pytest.approx(
        cap["clipstream"] / cap["naive"], rel=0.01, abs=0.005
    )
    assert float(summary["p50_vs_floor"]) == pytest.approx(
        p50["clipstream"] / p50["floor"], rel=0.01, abs=0.005
    )
    if "peer" in cap:
        assert float(summary["speedup_vs_peer"]) == pytest.approx(
            cap["clipstream"] / cap["peer"], rel=0.01, abs=0.005
        )
    assert png.stat().st_size > 10_000  # a drawn figure, not an empty file
