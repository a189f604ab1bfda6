"""Smoke run of ``clipstream bench`` on the test broker: every system for a few seconds.

Asserts what the run must produce, never how fast anything was (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clipstream.streams.bench import peer
from clipstream.streams.bench.ensemble import BURST_COPIES, FEEDBACK_PAIRS
from clipstream.streams.bench.paired import order
from clipstream.streams.bench.report import parse_summary
from clipstream.streams.runtime.processes import clipstream_command
from clipstream.streams.wire.config import Settings

pytestmark = pytest.mark.integration


def system_processes(name: str, workers: int) -> set[str]:
    """The processes the bench starts for a system (clipstream: one replica per worker)."""
    if not name.startswith("clipstream"):
        return {name}
    if workers == 1:
        return {"worker", "replica-bench-digits-logreg"}
    return {f"worker-{i}" for i in range(workers)} | {
        f"replica-bench-digits-logreg-{i}" for i in range(workers)
    }


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


def bench(
    kafka_settings: Settings, *args: str, timeout: float = 280
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(kafka_settings.partitions),
    }
    done = subprocess.run(
        clipstream_command("bench", *args), env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_costed(cost: dict, processes: set[str], what: object) -> None:
    """A metered phase: every process has a CPU figure, the roles add up, shares sum to 1."""
    assert cost["answered"] > 0, what
    assert processes <= set(cost["processes"]), (what, cost["processes"].keys())
    assert {"broker", "loadgen"} <= set(cost["processes"]), what
    per_query = cost["cpu_us_per_query"]
    assert per_query["broker"] > 0 and per_query["loadgen"] > 0, what
    own = [c["cpu_us_per_query"] for c in cost["processes"].values() if c["role"] == "system"]
    assert per_query["system"] == pytest.approx(sum(own)), what
    if "workers" in cost:
        shares = [w["share"] for w in cost["workers"].values()]
        assert sum(shares) == pytest.approx(1.0), (what, shares)
        queries = sum(w["queries"] for w in cost["workers"].values())
        assert queries >= cost["answered"], what  # each answered query was taken in once


def test_bench_runs_every_system_side_by_side(kafka_settings: Settings, tmp_path: Path) -> None:
    # the peer joins only if its virtualenv is already there: creating it takes minutes
    systems = ["floor", "naive", "clipstream", "clipstream-cache"]
    if peer.installed():
        systems.append("peer")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    done = bench(
        kafka_settings,
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
        "--workers",
        "2",
        "--out",
        str(out),
        "--plot",
        str(png),
    )

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
            assert_costed(run["cost"], system_processes(name, 2), (name, phase))
        # every process of the system used CPU over its phases (a phase alone may be
        # shorter than the kernel's clock tick for an idle replica)
        for proc in system_processes(name, 2):
            used = sum(f[p]["cost"]["processes"][proc]["cpu_s"] for p in ("light", "capacity"))
            assert used > 0, (name, proc)
        if name in ("floor", "clipstream"):  # both stamp their Predictions
            assert set(f["light"]["stages_p50_us"]) == {
                "client_to_worker",
                "in_worker",
                "worker_to_client",
            }
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
    assert summary["basis"] == "burst"
    assert float(summary["ceiling_vs_naive"]) == pytest.approx(
        cap["floor"] / cap["naive"], rel=0.01, abs=0.005
    )
    cpu = {
        n: f["capacity"]["cost"]["cpu_us_per_query"]["system"]
        for n, f in figures["systems"].items()
    }
    assert float(summary["cpu_vs_naive"]) == pytest.approx(
        cpu["clipstream"] / cpu["naive"], rel=0.01, abs=0.005
    )
    assert png.stat().st_size > 10_000  # a drawn figure, not an empty file


def test_the_sweep_is_refined_at_the_knee(kafka_settings: Settings, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    done = bench(
        kafka_settings,
        "--systems",
        "naive,clipstream",
        "--sweep",
        "--sweep-start",
        "400",
        "--deadline-ms",
        "2000",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--burst",
        "200",
        # warms the broker through the floor's relay, which is then stopped
        "--broker-warmup",
        "0.5",
        "--out",
        str(out),
        "--plot",
        str(png),
    )
    figures = json.loads(out.read_text())
    assert set(figures["systems"]) == {"naive", "clipstream"}
    assert all(f["light"]["lost"] == 0 for f in figures["systems"].values())
    # the test broker is a HotSpot JVM: its JIT is seen, and the warm-up lasted at least the
    # minimum, then until the JIT went quiet (or the cap)
    warmed = figures["broker_warm_up"]
    assert warmed["jit_cores"] is not None and warmed["seconds"] >= 0.5
    slo = figures["plan"]["slo_ms"]
    best = {}
    for name, f in figures["systems"].items():
        points = {p["rate"]: p for p in f["sweep"]}

        def held(p: dict) -> bool:
            return p["p99_ms"] <= slo and p["lost"] == 0 and p["throughput_qps"] >= 0.9 * p["rate"]

        high, low = f["max_rate_under_slo"], f["first_failed_rate"]
        best[name] = high
        assert low is not None, name  # nothing here holds 100,000 q/s
        assert not held(points[low]), name
        if high is None:  # nothing held down to the sweep's lowest rate
            assert min(points) == low and low / figures["plan"]["sweep_factor"] < 10.0
        else:
            assert held(points[high]), name
            assert high < low <= high * 1.25 + 1e-6, (name, high, low)  # known within 25 %
        for p in f["sweep"]:
            assert p["deadline_ms"] == 2000
            assert_costed(p["cost"], system_processes(name, 1), (name, p["rate"]))
    summary = parse_summary(done.stdout.strip().splitlines()[-1])
    assert summary["basis"] == "slo"
    if best["clipstream"] and best["naive"]:
        assert float(summary["speedup_vs_naive"]) == pytest.approx(
            best["clipstream"] / best["naive"], rel=0.01, abs=0.005
        )
        assert float(summary["throughput_qps"]) == pytest.approx(best["clipstream"], abs=0.5)
    else:
        assert summary["speedup_vs_naive"] == "na"
    assert png.stat().st_size > 10_000


ENSEMBLE_PROCESSES = {
    "worker-0",
    "worker-1",
    "replica-bench-digits-logreg",
    "replica-bench-digits-forest",
    "replica-bench-digits-svc",
}


def test_the_ensemble_suite_with_feedback(kafka_settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "ensemble.json"
    done = bench(
        kafka_settings,
        "--suite",
        "ensemble",
        "--feedback",
        "--rate",
        "40",
        # an objective nothing meets: the sweep steps down from 20 q/s to its lowest rate
        "--slo-ms",
        "0.001",
        "--sweep-start",
        "20",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--broker-warmup",
        "0",
        "--out",
        str(out),
    )
    figures = json.loads(out.read_text())
    assert figures["app"]["workers"] == 2 and figures["app"]["personalised_users"] == 32
    assert figures["app"]["deadline_ms"] == 1000
    assert [p["rate"] for p in figures["sweep"]] == [12.5, 20.0]
    assert figures["max_rate_under_slo"] is None
    for p in figures["sweep"]:
        assert p["lost"] == 0 and p["received"] == p["sent"] > 0
        assert 0 < p["full_ensembles"] <= p["received"]
        assert_costed(p["cost"], ENSEMBLE_PROCESSES, p["rate"])
        fb = p["cost"]["feedback"]  # --feedback: one record per answer by a model
        assert p["received"] - p["defaults"] - p["errors"] <= fb["sent"] <= p["cost"]["answered"]
        assert fb["applied"] == fb["sent"] and fb["lost"] == 0, fb
    assert figures["sweep_dead_letters"].get("feedback", 0) == 0

    feedback = figures["feedback"]
    a, b, burst = feedback["queries_only"], feedback["with_feedback"], feedback["burst"]
    assert "feedback" not in a["cost"] and a["feedback_sent"] == 0
    assert b["feedback_sent"] == b["cost"]["feedback"]["applied"] > 0
    assert 0 < burst["sent"] == burst["cost"]["feedback"]["applied"]
    # BURST_COPIES records for each of A's answered queries
    assert burst["sent"] % BURST_COPIES == 0 and burst["sent"] // BURST_COPIES <= a["received"]
    assert burst["applied_per_s"] > 0 and burst["workers_cpu_us_per_record"] > 0
    applied = sum(w["feedback_applied"] for w in burst["cost"]["workers"].values())
    assert applied == burst["sent"]
    for dead in feedback["dead_letters"].values():
        assert dead.get("feedback", 0) == 0

    # A and B phases alternate (ABBA, then BAAB); the estimate is the least-squares cost of
    # a feedback record with the replicas' CPU per query (the machine's speed) held fixed
    rows = feedback["phases"]
    assert [r["feedback"] for r in rows] == order(FEEDBACK_PAIRS)
    for r in rows:
        assert r["answered"] > 0 and r["replicas_cpu_us_per_query"] > 0
        assert (0 < r["applied"] <= r["answered"]) if r["feedback"] else r["applied"] == 0
    x = np.array([[1.0, r["feedback_per_query"], r["replicas_cpu_us_per_query"]] for r in rows])
    y = np.array([r["workers_cpu_us_per_query"] for r in rows])
    fit = np.linalg.lstsq(x, y, rcond=None)[0]
    assert feedback["cpu_us_per_feedback"] == pytest.approx(fit[1])
    assert feedback["cpu_us_per_feedback_se"] > 0

    summary = parse_summary(done.stdout.strip().splitlines()[-1])
    assert summary["suite"] == "ensemble" and summary["max_rate_under_slo"] == "na"
    assert float(summary["feedback_applied_per_s"]) == pytest.approx(
        burst["applied_per_s"], abs=0.5
    )
    assert float(summary["cpu_us_per_feedback_se"]) == pytest.approx(
        feedback["cpu_us_per_feedback_se"], abs=0.5
    )


def test_the_objective_suite_reports_lateness(kafka_settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "objective.json"
    done = bench(
        kafka_settings,
        "--suite",
        "objective",
        "--slo-ms",
        "0.001",
        "--sweep-start",
        "15",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--broker-warmup",
        "0",
        "--out",
        str(out),
    )
    figures = json.loads(out.read_text())
    assert figures["app"]["deadline_ms"] == 20 and "feedback" not in figures
    (point,) = figures["sweep"]  # 15 q/s fails the objective; 15 / 1.6 is under 10
    assert point["deadline_ms"] == 20
    assert point["lost"] == 0 and point["received"] == point["sent"] > 0
    assert point["full_ensembles"] + point["defaults"] <= point["received"]
    # the client receives an answer after the worker emitted it (one host, one clock)
    assert point["max_late_worker_ms"] <= point["max_late_client_ms"] + 1.0
    assert point["max_late_client_ms"] == pytest.approx(point["max_ms"] - 20)
    assert_costed(point["cost"], ENSEMBLE_PROCESSES, "objective")
    summary = parse_summary(done.stdout.strip().splitlines()[-1])
    assert summary["suite"] == "objective" and summary["deadline_ms"] == "20"
