"""``clipstream bench --suite ensemble|objective``: a realistic app under load.

The app: Exp4 over three digits models (logistic regression, random forest, SVC),
personalised over ``users`` users (each query names one), served by ``workers`` workers
and one replica per model, cache off. Both suites sweep the offered rate with the
comparison's refined sweep and report, per rate, p50/p99, the share of full ensembles
(every model answered), default outputs, the latest answer past its deadline, and what
it cost per process.

- ``ensemble``: deadline ``plan.deadline_ms`` (1 s unless told), objective p99 <=
  ``slo_ms``; with ``plan.feedback`` every answer is followed by one feedback record.
  Then feedback as a throughput of its own, at ``plan.light_rate``: phases of queries
  only (A) and of the same queries plus one feedback record each (B), alternating in ABBA
  order, give the workers' extra CPU per feedback record with its standard error
  (clipstream.streams.bench.paired); a burst of feedback for the first A's queries gives records
  applied per second and the workers' CPU per record.
- ``objective``: Clipper's set-up, a 20 ms deadline on the app (``plan.deadline_ms``),
  the sweep alone.

The models are served as ONNX (converted from scikit-learn with skl2onnx) unless
``plan.model_format`` is ``skops``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from rich.table import Table

from clipstream.models.control import registry
from clipstream.models.files import load_model, save_onnx
from clipstream.models.training import digits_split, train_digits_models
from clipstream.streams.bench.compare import Plan, Progress, sweep
from clipstream.streams.bench.loadgen import LoadResult, produce, run_load, wait_ready
from clipstream.streams.bench.meter import (
    SYSTEM,
    DeadLetters,
    LearningDone,
    PhaseMeter,
    Watched,
    shared_processes,
)
from clipstream.streams.bench.paired import Phase, estimate, order
from clipstream.streams.bench.systems import avro_protocol, spawn_clipstream, wait_for_workers
from clipstream.streams.bench.warmup import broker_jit, warm_up, warm_up_parts
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings

MODELS = ("digits-logreg", "digits-forest", "digits-svc")
#: deployed under names of the bench's own, so a cluster's own deployments stay untouched
DEPLOYED = {m: f"bench-{m}" for m in MODELS}
SUITES = ("ensemble", "objective")
#: the deadline each suite's app has unless the command line gives one
DEADLINES_MS = {"ensemble": 1000, "objective": 20}


def run_ensemble(
    settings: Settings,
    workdir: Path,
    suite: str,
    plan: Plan,
    progress: Progress,
) -> dict[str, Any]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; one of {', '.join(SUITES)}")
    trained = train_digits_models(workdir / "models", names=list(MODELS))
    _, X, _, y = digits_split()
    X = np.ascontiguousarray(X, dtype=float)
    topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan.of(settings).core())
    for name, deployed in DEPLOYED.items():
        path, fmt = trained[name][0], "skops"
        if plan.model_format == "onnx":
            # a serving runtime's cost per call: scikit-learn's random forest spends ~4 ms
            # on one row, onnxruntime ~0.03 ms (measured here), and this machine has two
            # cores for the broker, two workers, three replicas and the load generator
            path, fmt = save_onnx(load_model(path), path.with_suffix(".onnx"), X.shape[1]), "onnx"
        registry.deploy_model(settings, deployed, str(path), fmt=fmt, input_dim=X.shape[1])
    app = f"bench-{suite}-{uuid.uuid4().hex[:8]}"
    registry.register_app(
        settings,
        app,
        list(DEPLOYED.values()),
        policy="EXP4",
        deadline_ms=plan.deadline_ms,
        personalised=True,
        input_dim=X.shape[1],
        cache=False,
    )
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(settings.partitions),
    }
    children, urls = spawn_clipstream(
        workdir / "logs", env, plan.workers, dict.fromkeys(DEPLOYED.values(), 1)
    )
    try:
        wait_for_workers(settings, plan.workers)
        protocol = avro_protocol(
            topics.QUERIES, topics.PREDICTIONS, app, users=plan.users, labels=y
        )
        ready_s = wait_ready(settings, protocol, X)
        watched = [Watched(c.name, SYSTEM, c.pid, metrics_url=urls.get(c.name)) for c in children]
        warmed = None
        if plan.warm_broker_s > 0:

            def run(seconds: float) -> None:
                run_load(
                    settings,
                    suite,
                    protocol,
                    X,
                    rate=plan.light_rate,
                    duration_s=seconds,
                    warmup_s=0.0,
                    deadline_ms=plan.deadline_ms,
                    progress=lambda s, g: progress("warm-up (not counted)", -1, s, g),
                    # the paths the sweep runs: with feedback, learning and state writes
                    feedback=plan.feedback,
                )

            warmed = warm_up(run, broker_jit(settings), plan.warm_broker_s)
        learnt = LearningDone(settings)
        meter = PhaseMeter(watched + shared_processes(settings), settled=learnt)
        dead = DeadLetters(settings)
        try:
            points, best, failed = sweep(
                settings, suite, protocol, X, plan, progress, meter, feedback=plan.feedback
            )
            figures: dict[str, Any] = {
                "suite": suite,
                "app": {
                    "models": list(MODELS),
                    "policy": "EXP4",
                    "personalised_users": plan.users,
                    "deadline_ms": plan.deadline_ms,
                    "workers": plan.workers,
                    "replicas_per_model": 1,
                    "model_format": plan.model_format,
                },
                "ready_s": round(ready_s, 2),
                "broker_warm_up": warmed.__dict__ if warmed is not None else None,
                "slo_ms": plan.slo_ms,
                "sweep": points,
                "max_rate_under_slo": best,
                "first_failed_rate": failed,
                "sweep_dead_letters": dead.count(),
            }
            if suite == "ensemble":
                figures["feedback"] = feedback_phases(
                    settings, protocol, X, plan, meter, dead, progress
                )
        finally:
            dead.close()
            learnt.close()
    finally:
        for child in children:
            child.stop()
    figures["cpus"] = os.cpu_count()
    figures["plan"] = plan.__dict__
    return figures


#: A/B pairs of feedback phases, in ABBA order and adjusted for the machine's speed
#: (bench.paired): one pair's difference swung from -12 to 350 us over twelve runs
FEEDBACK_PAIRS = 4


def feedback_phases(
    settings: Settings,
    protocol: Any,
    X: np.ndarray,
    plan: Plan,
    meter: PhaseMeter,
    dead: DeadLetters,
    progress: Progress,
) -> dict[str, Any]:
    """Feedback side by side with queries in one run: phases of queries only (A) and of
    the same queries plus one feedback record each (B), alternating; then a burst of
    feedback alone for the first A phase's answered queries."""

    def phase(feedback: bool, i: int) -> LoadResult:
        label = f"{'B queries + feedback' if feedback else 'A queries only'} ({i + 1})"
        return run_load(
            settings,
            f"feedback {label}",
            protocol,
            X,
            rate=plan.light_rate,
            duration_s=2 * plan.duration_s,
            warmup_s=plan.warmup_s,
            arrivals=plan.arrivals,
            deadline_ms=plan.deadline_ms,
            progress=lambda s, g: progress(f"feedback {label}", -1, s, g),
            feedback=feedback,
            meter=meter,
        )

    treated = order(FEEDBACK_PAIRS)
    results = [phase(feedback, i) for i, feedback in enumerate(treated)]
    dead_phases = dead.count()
    a = next(r for r, t in zip(results, treated, strict=True) if not t)
    b = next(r for r, t in zip(results, treated, strict=True) if t)
    burst = feedback_burst(settings, protocol, a.answered_rows, meter)
    dead_burst = dead.count()
    rows = [phase_row(r.cost, t) for r, t in zip(results, treated, strict=True)]
    found = estimate(
        [
            Phase(
                r["feedback"],
                r["feedback_per_query"],
                r["workers_cpu_us_per_query"],
                r["replicas_cpu_us_per_query"],
            )
            for r in rows
            if r["workers_cpu_us_per_query"] is not None
        ]
    )
    return {
        "rate": plan.light_rate,
        "queries_only": a,
        "with_feedback": b,
        "phases": rows,
        "burst": burst,
        "dead_letters": {"phases": dead_phases, "burst": dead_burst},
        "cpu_us_per_feedback": found.effect if found else None,
        "cpu_us_per_feedback_se": found.se if found else None,
        "cpu_us_per_feedback_unadjusted": found.raw if found else None,
        "cpu_us_per_feedback_unadjusted_se": found.raw_se if found else None,
        "estimate": found.describe() if found else "na",
    }


def workers_cpu_s(cost: dict[str, Any]) -> float:
    return sum(cost["processes"][n]["cpu_s"] for n in cost.get("workers", {}))


def phase_row(cost: dict[str, Any], feedback: bool) -> dict[str, Any]:
    """One A/B phase: the workers' CPU per query, and the replicas' (the same batches with
    feedback or without: the machine's speed in that phase)."""
    answered = cost.get("answered", 0)
    workers = cost.get("workers", {})
    replicas = sum(
        p["cpu_s"]
        for n, p in cost.get("processes", {}).items()
        if p["role"] == SYSTEM and n not in workers
    )
    applied = cost.get("feedback", {}).get("applied", 0)
    return {
        "feedback": feedback,
        "answered": answered,
        "applied": applied,
        "feedback_per_query": applied / answered if answered else 0.0,
        "workers_cpu_us_per_query": workers_cpu_s(cost) * 1e6 / answered if answered else None,
        "replicas_cpu_us_per_query": replicas * 1e6 / answered if answered else None,
        "state_staleness_ms": cost.get("state_staleness_ms"),
    }


#: feedback records per answered query in the burst: a burst of one each (1,500 records,
#: ~0.15 s of the workers' CPU) measured within the /proc clock tick and run-to-run noise
#: of the 100 us it is compared with; a second record for a query is applied like the
#: first (a later reward for the same answer)
BURST_COPIES = 5


def feedback_burst(
    settings: Settings, protocol: Any, answered_rows: dict[str, int], meter: PhaseMeter
) -> dict[str, Any]:
    """``BURST_COPIES`` feedback records for every answered query, sent at once; the
    workers' rate of applying them (state updated and changelogged) and their CPU per
    record."""
    assert protocol.feedback is not None
    producer = Producer(settings.kafka(**{"linger.ms": 5, "enable.idempotence": True}))
    sent = BURST_COPIES * len(answered_rows)
    before = meter.start()
    for _ in range(BURST_COPIES):
        for qid, row in answered_rows.items():
            produce(producer, *protocol.feedback(qid, row))
    producer.flush(30)
    cost = meter.stop(before, 0, sent, settle_s=60.0)
    fb = cost.get("feedback", {})
    applied = fb.get("applied", 0)
    return {
        "sent": sent,
        "cost": cost,
        "applied_per_s": fb.get("applied_per_s"),
        "workers_cpu_us_per_record": workers_cpu_s(cost) * 1e6 / applied if applied else None,
    }


def summary_line(figures: dict[str, Any]) -> str:
    """``bench: suite=... key=value ...`` for the ensemble and objective suites."""
    points: list[LoadResult] = figures["sweep"]
    best = figures["max_rate_under_slo"]
    at = next((p for p in points if p.rate == best), None)

    def fmt(v: float | None, digits: int = 2) -> str:
        return "na" if v is None else f"{v:.{digits}f}"

    parts = {
        "suite": figures["suite"],
        "workers": str(figures["app"]["workers"]),
        "models": figures["app"].get("model_format", "skops"),
        "deadline_ms": str(figures["app"]["deadline_ms"]),
        "max_rate_under_slo": fmt(best, 0),
        "p99_ms_at_max": fmt(at.p99_ms if at else None),
        "full_share_at_max": fmt(at.full_ensembles / at.received if at and at.received else None),
        "defaults_at_max": str(at.defaults) if at else "na",
        "max_late_worker_ms_at_max": fmt(at.max_late_worker_ms if at else None),
        "system_cpu_us_per_query_at_max": fmt(
            at.cost.get("cpu_us_per_query", {}).get("system") if at else None, 0
        ),
    }
    parts.update(warm_up_parts(figures.get("broker_warm_up")))
    fb = figures.get("feedback")
    if fb is not None:
        parts["feedback_applied_per_s"] = fmt(fb["burst"]["applied_per_s"], 0)
        parts["cpu_us_per_feedback"] = fmt(fb["cpu_us_per_feedback"], 0)
        parts["cpu_us_per_feedback_se"] = fmt(fb["cpu_us_per_feedback_se"], 0)
        stale = fb["with_feedback"].cost.get("state_staleness_ms") or {}
        parts["state_staleness_p99_ms"] = fmt(stale.get("p99"), 1)
    return "bench: " + " ".join(f"{k}={v}" for k, v in parts.items())


def _share(n: int, of: int) -> str:
    return f"{n / of:.2f}" if of else "na"


def sweep_table(figures: dict[str, Any]) -> Table:
    """One row per offered rate: latency, completeness, lateness, cost, workers' shares."""
    t = Table(
        "offered q/s",
        "answered q/s",
        "p50 ms",
        "p99 ms",
        "full ensembles",
        "defaults",
        "lost",
        "max late client ms",
        "max late worker ms",
        "system CPU us/q",
        "worker shares",
        "feedback sent/applied/refused/lost",
        title=f"{figures['suite']}: Exp4 over {', '.join(figures['app']['models'])} "
        f"({figures['app'].get('model_format', 'skops')}), "
        f"{figures['app']['personalised_users']} users, {figures['app']['workers']} workers, "
        f"deadline {figures['app']['deadline_ms']} ms, objective p99 <= {figures['slo_ms']} ms",
    )
    for r in figures["sweep"]:
        cost = r.cost
        shares = "/".join(
            "na" if w["share"] is None else f"{w['share']:.2f}"
            for w in cost.get("workers", {}).values()
        )
        fb = cost.get("feedback")
        t.add_row(
            f"{r.rate:.0f}",
            f"{r.throughput_qps:.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            _share(r.full_ensembles, r.received),
            str(r.defaults),
            str(r.lost),
            "na" if r.max_late_client_ms is None else f"{r.max_late_client_ms:.1f}",
            "na" if r.max_late_worker_ms is None else f"{r.max_late_worker_ms:.1f}",
            "na"
            if cost.get("cpu_us_per_query", {}).get("system") is None
            else f"{cost['cpu_us_per_query']['system']:.0f}",
            shares or "-",
            "-"
            if fb is None
            else f"{fb['sent']}/{fb['applied']}/{fb['rejected'] + fb['invalid']}/{fb['lost']}",
        )
    return t


def feedback_table(figures: dict[str, Any]) -> Table:
    """Feedback as a throughput of its own, next to the queries it follows."""
    fb = figures["feedback"]
    t = Table(
        "phase",
        "queries answered",
        "feedback applied",
        "applied/s",
        "workers CPU us/q",
        "replicas CPU us/q",
        "state staleness p50/p99 ms",
        title=f"feedback at {fb['rate']:.0f} q/s; extra workers CPU per feedback record: "
        + fb["estimate"],
    )
    for i, row in enumerate(fb["phases"]):
        t.add_row(
            f"{'B queries + feedback' if row['feedback'] else 'A queries only'} ({i + 1})",
            str(row["answered"]),
            str(row["applied"]),
            "-",
            _us(row["workers_cpu_us_per_query"]),
            _us(row["replicas_cpu_us_per_query"]),
            _staleness(row),
        )
    burst = fb["burst"]
    cost = burst["cost"]
    t.add_row(
        "feedback burst",
        str(cost["answered"]),
        str(cost.get("feedback", {}).get("applied", 0)),
        f"{burst['applied_per_s'] or 0.0:.0f}",
        "-",
        "-",
        _staleness(cost),
    )
    t.caption = (
        f"burst: {_us(burst['workers_cpu_us_per_record'])} us of workers CPU per record; "
        f"feedback dead letters {fb['dead_letters']['burst'].get('feedback', 0)}"
    )
    return t


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _staleness(cost: dict[str, Any]) -> str:
    stale = cost.get("state_staleness_ms")
    return "-" if not stale else f"{stale['p50']:.1f}/{stale['p99']:.1f}"
