"""What a comparison run leaves behind: a JSON file of every figure, a table, one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from streams.bench.compare import capacity_of
from streams.bench.loadgen import LoadResult


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
            "-" if "sweep" not in f else (f"{best:.0f}" if best else "< start"),
            str(light.lost + cap.lost),
            str(light.defaults + cap.defaults),
            str(light.errors + cap.errors),
            "/".join(f"{x:.1f}" for x in f.get("loadavg_1m", [])),
        )
    return t


def _fmt(value: float | None, digits: int) -> str:
    return "na" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


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
        "speedup_vs_naive": _fmt(r["speedup_vs_naive"], 2),
        "p50_vs_floor": _fmt(r["p50_vs_floor"], 2),
        "speedup_vs_peer": _fmt(r["speedup_vs_peer"], 2),
    }
    return "bench: " + " ".join(f"{k}={v}" for k, v in parts.items())


def parse_summary(line: str) -> dict[str, str]:
    """The key=value pairs of a summary line (for tests and scripts)."""
    assert line.startswith("bench: "), line
    return dict(pair.split("=", 1) for pair in line[len("bench: ") :].split())
