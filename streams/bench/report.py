"""What a comparison run leaves behind: a JSON file of every figure, tables, one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from clipstream.streams.bench.compare import capacity_of, held
from clipstream.streams.bench.loadgen import LoadResult
from clipstream.streams.bench.warmup import warm_up_parts


def to_jsonable(value: Any) -> Any:
    """LoadResults become their figures (with the histogram); NaN becomes null."""
    if isinstance(value, LoadResult):
        return to_jsonable(value.figures())
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(figures: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(figures), indent=2))


def table(figures: dict[str, Any]) -> Table:
    t = Table(
        "system",
        "light p50 ms",
        "light p99 ms",
        "capacity q/s",
        "burst p99 ms",
        "max q/s p99<=SLO",
        "lost",
        "defaults",
        "errors",
        "load 1m",
        title=f"model {figures['model']} ({figures['input_dim']} features), "
        f"{figures.get('cpus')} CPUs",
    )
    for name, f in figures["systems"].items():
        light, cap = f["light"], f["capacity"]
        best = f.get("max_rate_under_slo")
        t.add_row(
            name,
            f"{light.p50_ms:.1f}",
            f"{light.p99_ms:.1f}",
            f"{cap.throughput_qps:.0f}",
            f"{cap.p99_ms:.0f}",
            "-" if "sweep" not in f else (f"{best:.0f}" if best else "none"),
            str(light.lost + cap.lost),
            str(light.defaults + cap.defaults),
            str(light.errors + cap.errors),
            "/".join(f"{x:.1f}" for x in f.get("loadavg_1m", [])),
        )
    return t


def _fmt(value: float | None, digits: int) -> str:
    return "na" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


HOPS = ("client_to_worker", "in_worker", "worker_to_client")


def hops_table(figures: dict[str, Any]) -> Table:
    """Where the light-load time goes (medians of each Prediction's own stamps) and what
    a query costs in CPU at the burst: the system's own processes, the broker, the client."""
    t = Table(
        "system",
        *(f"{h.replace('_', ' ')} p50 ms" for h in HOPS),
        "system CPU us/q",
        "broker us/q",
        "loadgen us/q",
        title="light-load p50 per hop; CPU per answered query at the burst",
    )
    for name, f in figures["systems"].items():
        stages = f["light"].stages_p50_us
        per_query = f["capacity"].cost.get("cpu_us_per_query", {})
        t.add_row(
            name,
            *(_fmt(stages[h] / 1000, 1) if h in stages else "-" for h in HOPS),
            _fmt(per_query.get("system"), 0),
            _fmt(per_query.get("broker"), 0),
            _fmt(per_query.get("loadgen"), 0),
        )
    return t


def cpu_table(figures: dict[str, Any]) -> Table:
    """CPU per answered query of every process, per system and phase."""
    t = Table(
        "system",
        "phase",
        "process",
        "cores",
        "CPU us/q",
        title="CPU per process (utime+stime from /proc, over each phase)",
    )
    for name, f in figures["systems"].items():
        for phase in ("light", "capacity"):
            for proc, c in f[phase].cost.get("processes", {}).items():
                t.add_row(
                    name,
                    "burst" if phase == "capacity" else phase,
                    proc,
                    _fmt(c["cores"], 2),
                    _fmt(c["cpu_us_per_query"], 0),
                )
    return t


def workers_table(figures: dict[str, Any]) -> Table | None:
    """Each clipstream worker's share of the queries and its CPU, per phase."""
    t = Table(
        "system",
        "phase",
        "worker",
        "queries",
        "share",
        "CPU us per answered q",
        "CPU us per own q",
        title="clipstream workers (their own clipstream_queries_total)",
    )
    for name, f in figures["systems"].items():
        for phase in ("light", "capacity"):
            cost = f[phase].cost
            for worker, w in cost.get("workers", {}).items():
                t.add_row(
                    name,
                    "burst" if phase == "capacity" else phase,
                    worker,
                    f"{w['queries']:.0f}",
                    _fmt(w["share"], 2),
                    _fmt(cost["processes"].get(worker, {}).get("cpu_us_per_query"), 0),
                    _fmt(w["cpu_us_per_own_query"], 0),
                )
    return t if t.row_count else None


def sweep_table(figures: dict[str, Any]) -> Table | None:
    t = Table(
        "system",
        "offered q/s",
        "answered q/s",
        "p50 ms",
        "p99 ms",
        "lost",
        "defaults",
        "system CPU us/q",
        "held",
        title="sweep: p99 against the objective per offered rate",
    )
    slo_ms = figures["plan"]["slo_ms"]
    for name, f in figures["systems"].items():
        for r in f.get("sweep", []):
            t.add_row(
                name,
                f"{r.rate:.0f}",
                f"{r.throughput_qps:.0f}",
                _fmt(r.p50_ms, 1),
                _fmt(r.p99_ms, 1),
                str(r.lost),
                str(r.defaults),
                _fmt(r.cost.get("cpu_us_per_query", {}).get("system"), 0),
                "yes" if held(r, slo_ms) else "no",
            )
    return t if t.row_count else None


def summary_line(figures: dict[str, Any], system: str = "clipstream") -> str:
    """``bench: key=value ...``, speaking for ``system``; ratios from this run's figures."""
    f = figures["systems"].get(system)
    r = figures["ratios"]
    if f is None:
        return f"bench: system={system} measured=no"
    parts = {
        "system": system,
        "model": figures["model"],
        "rate": _fmt(f["light"].rate, 0),
        "throughput_qps": _fmt(capacity_of(f), 0),
        "p50_ms": _fmt(f["light"].p50_ms, 2),
        "p99_ms": _fmt(f["light"].p99_ms, 2),
        "lost": str(sum(f[k].lost for k in ("light", "capacity"))),
        "basis": r["basis"],
        "speedup_vs_naive": _fmt(r["speedup_vs_naive"], 2),
        "p50_vs_floor": _fmt(r["p50_vs_floor"], 2),
        "speedup_vs_peer": _fmt(r["speedup_vs_peer"], 2),
        "ceiling_vs_naive": _fmt(r["ceiling_vs_naive"], 2),
        "cpu_vs_naive": _fmt(r["cpu_vs_naive"], 2),
    }
    parts.update(warm_up_parts(figures.get("broker_warm_up")))
    return "bench: " + " ".join(f"{k}={v}" for k, v in parts.items())


def parse_summary(line: str) -> dict[str, str]:
    """The key=value pairs of a summary line (for tests and scripts)."""
    assert line.startswith("bench: "), line
    return dict(pair.split("=", 1) for pair in line[len("bench: ") :].split())
