"""The bench's arithmetic without a broker: arrival schedules, ratios and the summary line."""

from __future__ import annotations

import numpy as np
import pytest

from clipstream.streams.bench.compare import ratios
from clipstream.streams.bench.loadgen import LoadResult, schedule
from clipstream.streams.bench.report import parse_summary, summary_line, to_jsonable


def result(system: str, tput: float, p50: float, rate: float | None = 100.0) -> LoadResult:
    return LoadResult(
        system=system,
        rate=rate,
        arrivals="constant",
        duration_s=1.0,
        sent=10,
        received=10,
        throughput_qps=tput,
        received_qps=tput,
        p50_ms=p50,
        p90_ms=p50,
        p99_ms=p50,
        p999_ms=p50,
        mean_ms=p50,
        max_ms=p50,
        deadline_ms=1000,
        deadline_misses=0,
        defaults=0,
        errors=0,
        lost=0,
        duplicates=0,
        cache_hits=0,
    )


def figures(**systems: tuple[float, float]) -> dict:
    out = {
        name: {"light": result(name, 100, p50), "capacity": result(name, cap, 99, None)}
        for name, (cap, p50) in systems.items()
    }
    return {"model": "m", "input_dim": 64, "systems": out, "ratios": ratios(out)}


def test_constant_schedule_is_evenly_spaced_at_the_rate() -> None:
    offsets = schedule(200.0, 5, "constant")
    assert np.allclose(np.diff(offsets), 1 / 200)
    assert offsets[0] == 0


def test_poisson_schedule_has_the_target_mean_rate() -> None:
    offsets = schedule(1000.0, 20_000, "poisson", seed=1)
    gaps = np.diff(offsets)
    assert np.all(gaps >= 0)
    assert abs(1 / gaps.mean() - 1000) < 50  # 20k exponential gaps: mean within 5%
    assert gaps.std() > 0.5 * gaps.mean()  # not constant spacing


def test_unknown_arrivals_are_refused() -> None:
    with pytest.raises(ValueError, match="arrivals"):
        schedule(1.0, 3, "bursty")


def test_ratios_come_from_the_measured_figures() -> None:
    f = figures(floor=(5000, 4.0), naive=(500, 3.0), clipstream=(2500, 6.0), peer=(1000, 8.0))
    assert f["ratios"]["speedup_vs_naive"] == pytest.approx(5.0)
    assert f["ratios"]["p50_vs_floor"] == pytest.approx(1.5)
    assert f["ratios"]["speedup_vs_peer"] == pytest.approx(2.5)
    assert f["ratios"]["ceiling_vs_naive"] == pytest.approx(10.0)


def test_a_sweep_rate_takes_precedence_over_burst_capacity() -> None:
    f = figures(naive=(500, 3.0), clipstream=(2500, 6.0))
    f["systems"]["clipstream"]["max_rate_under_slo"] = 1000.0
    f["systems"]["clipstream"]["sweep"] = []
    assert ratios(f["systems"])["speedup_vs_naive"] == pytest.approx(2.0)


def test_summary_line_parses_and_speaks_for_clipstream() -> None:
    f = figures(floor=(5000, 4.0), naive=(500, 3.0), clipstream=(2500, 6.0))
    pairs = parse_summary(summary_line(f))
    assert pairs["system"] == "clipstream"
    assert float(pairs["throughput_qps"]) == 2500
    assert float(pairs["p50_ms"]) == 6.0
    assert float(pairs["speedup_vs_naive"]) == 5.0
    assert pairs["speedup_vs_peer"] == "na"  # no peer measured: said, not invented
    assert pairs["lost"] == "0"


def test_json_form_has_no_nan_and_keeps_the_histogram() -> None:
    r = result("x", float("nan"), 1.0)
    r.histogram = {"edges_ms": [0.1, 1.0], "counts": [3]}
    out = to_jsonable({"r": r})
    assert out["r"]["throughput_qps"] is None
    assert out["r"]["histogram"]["counts"] == [3]
    assert "latencies_ms" not in out["r"]


def test_a_swept_system_with_no_rate_that_held_is_not_compared_by_its_burst() -> None:
    f = figures(naive=(500, 3.0), clipstream=(2500, 6.0))
    for name, best in (("naive", None), ("clipstream", 400.0)):
        f["systems"][name]["sweep"] = []
        f["systems"][name]["max_rate_under_slo"] = best
    r = ratios(f["systems"])
    assert r["basis"] == "slo"
    assert r["speedup_vs_naive"] is None  # not 2500/500 nor 400/500: said, not mixed


def test_summary_line_carries_the_ceiling_and_the_cpu_ratio() -> None:
    f = figures(floor=(5000, 4.0), naive=(500, 3.0), clipstream=(2500, 6.0))
    for name, us in (("naive", 200.0), ("clipstream", 300.0)):
        f["systems"][name]["capacity"].cost = {"cpu_us_per_query": {"system": us}}
    f["ratios"] = ratios(f["systems"])
    pairs = parse_summary(summary_line(f))
    assert pairs["basis"] == "burst"
    assert float(pairs["ceiling_vs_naive"]) == 10.0
    assert float(pairs["cpu_vs_naive"]) == 1.5
