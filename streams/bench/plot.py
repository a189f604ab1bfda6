"""Latency CDFs, throughput against offered rate and p99 against offered rate (with the
objective) for every system of a run (matplotlib, the optional ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot(figures: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'clipstream[bench]'") from exc

    fig, (cdf, tput, tail) = plt.subplots(1, 3, figsize=(19, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, f) in enumerate(figures["systems"].items()):
        colour = colours[i % len(colours)]  # one colour per system in both panels
        for phase, style in (("light", "-"), ("capacity", ":")):
            lat = np.sort(np.asarray(f[phase].latencies_ms))
            if len(lat):
                label = f"{name} ({'light' if phase == 'light' else 'burst'})"
                y = np.arange(1, len(lat) + 1) / len(lat)
                cdf.plot(lat, y, style, color=colour, label=label)
        points = f.get("sweep") or [f["light"]]
        offered = [p.rate for p in points]
        done = [p.throughput_qps for p in points]
        tput.plot(offered, done, "o-", color=colour, label=name)
        tput.axhline(f["capacity"].throughput_qps, color=colour, ls=":", lw=1)
        tail.plot(offered, [p.p99_ms for p in points], "o-", color=colour, label=name)
    slo_ms = figures.get("plan", {}).get("slo_ms")
    if slo_ms is not None:
        tail.axhline(slo_ms, color="black", ls="--", lw=1, label=f"objective {slo_ms:g} ms")
    cdf.set_xscale("log")
    cdf.set_xlabel("end-to-end latency at the client (ms)")
    cdf.set_ylabel("fraction of queries")
    cdf.set_title("latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=7)
    tput.set_xscale("log")
    tput.set_yscale("log")
    tput.set_xlabel("offered rate (queries/s)")
    tput.set_ylabel("answered (queries/s)")
    tput.set_title("throughput vs offered rate (dotted: burst capacity)")
    tput.grid(True, which="both", alpha=0.3)
    tput.legend(fontsize=7)
    tail.set_xscale("log")
    tail.set_yscale("log")
    tail.set_xlabel("offered rate (queries/s)")
    tail.set_ylabel("p99 latency at the client (ms)")
    tail.set_title("p99 vs offered rate (dashed: the objective)")
    tail.grid(True, which="both", alpha=0.3)
    tail.legend(fontsize=7)
    fig.suptitle(f"clipstream bench, model {figures['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
