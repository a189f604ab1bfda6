"""The side-by-side comparison: every system, one broker, one model, one load.

Per system: a run at light load (its p50 is the latency figure), a burst that measures
capacity (queries answered per second while the system is saturated), and with
``sweep`` the highest offered rate whose p99 stays under the latency objective. Every
phase is metered (``clipstream.streams.bench.meter``): CPU per query of each process the system
runs, of the broker and of the load generator, and each clipstream worker's share.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipstream.models.files import load_model
from clipstream.models.training import (
    digits_split,
    train_digits_models,
    train_wide_model,
    wide_dataset,
)
from clipstream.streams.bench import systems
from clipstream.streams.bench.loadgen import LoadResult, Protocol, run_load, wait_ready
from clipstream.streams.bench.meter import PhaseMeter
from clipstream.streams.bench.peer import PeerUnavailable
from clipstream.streams.bench.warmup import WarmUp, broker_jit, warm_up
from clipstream.streams.runtime.processes import Child
from clipstream.streams.wire.config import Settings

MODELS = ("digits-logreg", "digits-forest", "digits-knn", "digits-svc", "wide784-logreg")


@dataclass
class Plan:
    systems: tuple[str, ...] = systems.SYSTEMS
    model: str = "digits-logreg"
    light_rate: float = 100.0
    duration_s: float = 5.0
    warmup_s: float = 1.0
    burst: int = 5000
    arrivals: str = "constant"
    deadline_ms: int = 1000
    # a burst queues far past any light-load deadline; clipstream would answer those
    # queries with default outputs, which are not throughput, so bursts get a long one
    burst_deadline_ms: int = 60_000
    sweep: bool = False
    slo_ms: float = 50.0
    sweep_start: float = 250.0
    sweep_factor: float = 1.6
    sweep_max: float = 100_000.0
    #: when even the first rate fails, the sweep steps down to this rate at the lowest
    sweep_min: float = 10.0
    #: the knee is refined until the first failing rate is within this of the last held
    sweep_precision: float = 0.25
    warm_broker_s: float = 8.0
    #: clipstream's workers (and one replica per worker)
    workers: int = 1
    #: ensemble suites: users the personalised app serves, feedback with every answer
    users: int = 32
    feedback: bool = False
    #: ensemble, objective: how the three models are deployed (onnx: converted from
    #: scikit-learn with skl2onnx and served on onnxruntime; skops: scikit-learn itself)
    model_format: str = "onnx"


Progress = Callable[[str, int, int, int], None]  # (phase, total, sent, received)


def prepare_model(model: str, workdir: Path) -> tuple[Path, Any, np.ndarray, int]:
    """Train the named model; returns its file, the estimator, the query rows and width."""
    if model == "wide784-logreg":
        path, _ = train_wide_model(workdir / "models", dim=784)
        _, X, _, _ = wide_dataset(dim=784)
    elif model in MODELS:
        path = train_digits_models(workdir / "models", names=[model])[model][0]
        _, X, _, _ = digits_split()
    else:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    return path, load_model(path), np.ascontiguousarray(X, dtype=float), X.shape[1]


def model_compute_us(estimator: Any, X: np.ndarray, repeats: int = 200) -> float:
    """Median time of the model's own one-row predict_proba, in this process."""
    times = []
    for i in range(repeats):
        row = X[i % len(X)].reshape(1, -1)
        t = time.perf_counter_ns()
        estimator.predict_proba(row)
        times.append(time.perf_counter_ns() - t)
    return float(np.median(times) / 1000)


def held(r: LoadResult, slo_ms: float) -> bool:
    """A rate holds when p99 is within the objective, nothing is lost and models (not
    default outputs) answered at least 90 % of the offered rate."""
    assert r.rate is not None
    return r.p99_ms <= slo_ms and r.lost == 0 and r.throughput_qps >= 0.9 * r.rate


def next_rate(held_rate: float | None, failed_rate: float | None, plan: Plan) -> float | None:
    """The sweep's next offered rate, or None when the knee is known closely enough.

    Up by ``sweep_factor`` while every rate holds; down by it while none has; then
    geometric bisection between the highest rate that held and the lowest that failed,
    until the failure is within ``sweep_precision`` of the held rate."""
    if failed_rate is None:
        rate = plan.sweep_start if held_rate is None else held_rate * plan.sweep_factor
        return rate if rate <= plan.sweep_max else None
    if held_rate is None:
        rate = failed_rate / plan.sweep_factor
        return rate if rate >= plan.sweep_min else None
    if failed_rate <= held_rate * (1 + plan.sweep_precision):
        return None
    return math.sqrt(held_rate * failed_rate)


def sweep(
    settings: Settings,
    name: str,
    protocol: Protocol,
    X: np.ndarray,
    plan: Plan,
    progress: Progress,
    meter: PhaseMeter | None = None,
    feedback: bool = False,
) -> tuple[list[LoadResult], float | None, float | None]:
    """Find the highest rate whose p99 holds the objective, refined near the knee; returns
    the points by rate, that rate (None if none held down to ``sweep_min``) and the lowest
    rate that failed (None if none did up to ``sweep_max``)."""
    points: list[LoadResult] = []
    best: float | None = None
    failed: float | None = None
    while (rate := next_rate(best, failed, plan)) is not None:
        r = run_load(
            settings,
            name,
            protocol,
            X,
            rate=rate,
            duration_s=plan.duration_s,
            warmup_s=plan.warmup_s,
            arrivals=plan.arrivals,
            deadline_ms=plan.deadline_ms,
            progress=lambda s, g, n=rate: progress(f"{name} sweep {n:.0f}/s", -1, s, g),
            feedback=feedback,
            meter=meter,
        )
        points.append(r)
        if held(r, plan.slo_ms):
            best = rate
        else:
            failed = rate
    return sorted(points, key=lambda p: p.rate or 0.0), best, failed


def measure(
    name: str,
    ctx: systems.Context,
    X: np.ndarray,
    plan: Plan,
    progress: Progress,
) -> dict[str, Any]:
    """Start one system, measure it, stop it (the clipstream pair shares one start)."""
    protocol, children = systems.start(name, ctx)
    meter = PhaseMeter(ctx.watched(children))
    try:
        ready_s = wait_ready(ctx.settings, protocol, X)
        n_light = int(plan.light_rate * plan.duration_s) + int(plan.warmup_s * plan.light_rate)
        light = run_load(
            ctx.settings,
            name,
            protocol,
            X,
            rate=plan.light_rate,
            duration_s=plan.duration_s,
            warmup_s=plan.warmup_s,
            arrivals=plan.arrivals,
            deadline_ms=plan.deadline_ms,
            progress=lambda s, g: progress(f"{name} light {plan.light_rate:.0f}/s", n_light, s, g),
            meter=meter,
        )
        n_burst = plan.burst + int(plan.warmup_s * min(plan.light_rate, 200))
        capacity = run_load(
            ctx.settings,
            name,
            protocol,
            X,
            rate=None,
            burst=plan.burst,
            warmup_s=plan.warmup_s,
            deadline_ms=plan.burst_deadline_ms,
            grace_s=30.0,
            progress=lambda s, g: progress(f"{name} burst", n_burst, s, g),
            meter=meter,
        )
        out: dict[str, Any] = {
            "description": systems.DESCRIPTIONS[name],
            "ready_s": round(ready_s, 2),
            "light": light,
            "capacity": capacity,
        }
        if plan.sweep:
            points, best, failed = sweep(ctx.settings, name, protocol, X, plan, progress, meter)
            out["sweep"] = points
            out["max_rate_under_slo"] = best
            out["first_failed_rate"] = failed
        if name == "clipstream-cache":
            out["cache_hit_rate"] = capacity.cache_hits / max(1, capacity.received)
        return out
    finally:
        if name != "clipstream":  # the cached run reuses clipstream's worker and replica
            _stop(children)


def warm_broker(ctx: systems.Context, X: np.ndarray, plan: Plan, progress: Progress) -> WarmUp:
    """A broker that just started (JIT, page cache, group coordinator) is slow for its
    first seconds; that cost belongs to no system, so it is paid unmeasured
    (bench.warmup), through the floor's relay: it has no model, so no system under
    test inherits a backlog (a one-row forest in the naive loop serves ~250 q/s, far below
    the warm-up's rate)."""
    protocol, children = systems.start("floor", ctx)
    try:
        wait_ready(ctx.settings, protocol, X)

        def run(seconds: float) -> None:
            run_load(
                ctx.settings,
                "floor",
                protocol,
                X,
                # fast enough for the broker's JIT to meet what it runs hot soon
                rate=max(plan.light_rate * 5, 2000.0),
                duration_s=seconds,
                warmup_s=0.0,
                progress=lambda s, g: progress("broker warm-up (not counted)", -1, s, g),
            )

        return warm_up(run, broker_jit(ctx.settings), plan.warm_broker_s)
    finally:
        _stop(children)


def _stop(children: list[Child]) -> None:
    for child in children:
        child.stop()


def capacity_of(figures: dict[str, Any]) -> float | None:
    """The throughput a ratio uses: with a sweep, the highest rate that held the objective
    (None if none did: a sweep's figure is never compared with another's burst), else
    the burst capacity."""
    if "sweep" in figures:
        best = figures.get("max_rate_under_slo")
        return None if best is None else float(best)
    return float(figures["capacity"].throughput_qps)


def system_cpu_us(figures: dict[str, Any]) -> float | None:
    """CPU per query of all of a system's own processes, at its burst (saturated)."""
    return figures["capacity"].cost.get("cpu_us_per_query", {}).get("system")


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Computed from this run's own figures, so they are side by side by construction."""
    cs = results.get("clipstream")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def cap(name: str) -> float | None:
        return capacity_of(results[name]) if name in results else None

    def p50(name: str) -> float | None:
        return results[name]["light"].p50_ms if name in results else None

    def cpu(name: str) -> float | None:
        return system_cpu_us(results[name]) if name in results else None

    return {
        "basis": "slo" if any("sweep" in f for f in results.values()) else "burst",
        "speedup_vs_naive": ratio(cap("clipstream"), cap("naive")) if cs else None,
        "p50_vs_floor": ratio(p50("clipstream"), p50("floor")) if cs else None,
        "speedup_vs_peer": ratio(cap("clipstream"), cap("peer")) if cs else None,
        # the most any system on this path could gain over the naive loop here
        "ceiling_vs_naive": ratio(cap("floor"), cap("naive")),
        # CPU per query of the system's own processes, at saturation
        "cpu_vs_naive": ratio(cpu("clipstream"), cpu("naive")) if cs else None,
        "cpu_vs_floor": ratio(cpu("clipstream"), cpu("floor")) if cs else None,
    }


def run_compare(
    settings: Settings, workdir: Path, plan: Plan, progress: Progress, note: Callable[[str], None]
) -> dict[str, Any]:
    model_path, estimator, X, dim = prepare_model(plan.model, workdir)
    ctx = systems.Context(
        settings=settings,
        workdir=workdir,
        run_id=uuid.uuid4().hex[:8],
        model=plan.model,
        model_path=model_path,
        estimator=estimator,
        input_dim=dim,
        workers=plan.workers,
    )
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    warmed = None
    try:
        if plan.warm_broker_s > 0:
            warmed = warm_broker(ctx, X, plan, progress)
        for name in plan.systems:
            try:
                load_before = os.getloadavg()[0]
                results[name] = measure(name, ctx, X, plan, progress)
                # the machine may be shared: each system's figures say how busy it was
                results[name]["loadavg_1m"] = [load_before, os.getloadavg()[0]]
            except PeerUnavailable as exc:
                skipped[name] = str(exc)
                note(f"{name} skipped: {exc}")
            except TimeoutError as exc:
                skipped[name] = f"not serving: {exc}"
                note(f"{name} skipped: {exc}")
                note(f"logs in {ctx.logs}")
                if name.startswith("clipstream"):
                    _stop(ctx.children.pop("clipstream", []))
    finally:
        for children in ctx.children.values():
            _stop(children)
    compute_us = model_compute_us(estimator, X)
    targets: dict[str, Any] = {}
    if "clipstream" in results and "floor" in results:
        # the latency target: light-load p50 within 1.5x of the floor plus the
        # model's own compute time
        limit = 1.5 * (results["floor"]["light"].p50_ms + compute_us / 1000)
        targets["p50_limit_ms"] = limit
        targets["p50_within_limit"] = results["clipstream"]["light"].p50_ms <= limit
    return {
        "model": plan.model,
        "input_dim": dim,
        "model_compute_us_one_row": compute_us,
        "targets": targets,
        "cpus": os.cpu_count(),
        "plan": plan.__dict__,
        "broker_warm_up": warmed.__dict__ if warmed is not None else None,
        "systems": results,
        "skipped": skipped,
        "ratios": ratios(results),
    }
