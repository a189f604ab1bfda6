"""``clipstream bench``: its suites and their options; the measuring is in streams/bench."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipstream.streams.ops.cli.common import exit_on_sigterm


@click.command()
@click.option(
    "--suite",
    default="compare",
    show_default=True,
    type=click.Choice(["compare", "batching", "selection", "ensemble", "objective"]),
    help="compare: every system side by side under one load; batching: adaptive vs batch "
    "size 1 (needs Kafka); selection: Exp3/Exp4 on digits; ensemble: a personalised "
    "3-model Exp4 app swept over rates, and feedback throughput; objective: the same app "
    "with a 20 ms deadline",
)
@click.option(
    "--systems",
    default="floor,naive,clipstream,clipstream-cache,peer",
    show_default=True,
    help="compare: which systems, in order",
)
@click.option(
    "--model",
    default="digits-logreg",
    show_default=True,
    type=click.Choice(
        ["digits-logreg", "digits-forest", "digits-knn", "digits-svc", "wide784-logreg"]
    ),
    help="compare: the model every system serves",
)
@click.option("--rate", type=float, default=100.0, show_default=True, help="light load, q/s")
@click.option("--duration", type=float, default=5.0, show_default=True, help="seconds per run")
@click.option("--warmup", type=float, default=1.0, show_default=True, help="seconds not counted")
@click.option("--burst", type=int, default=5000, show_default=True, help="queries per burst")
@click.option(
    "--arrivals", type=click.Choice(["constant", "poisson"]), default="constant", show_default=True
)
@click.option(
    "--broker-warmup",
    type=float,
    default=8.0,
    show_default=True,
    help="unmeasured load before the first system: at least these seconds, then until the "
    "broker's JIT compiler is quiet (at most 90 s; 0: none)",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="clipstream workers, each with its own metrics port (compare: 1 and one replica "
    "per worker; ensemble, objective: 2 and one replica per model)",
)
@click.option(
    "--deadline-ms",
    type=int,
    default=None,
    help="the queries' deadline (compare, ensemble: 1000; objective: 20)",
)
@click.option(
    "--feedback", is_flag=True, help="ensemble: one feedback record per answered sweep query"
)
@click.option(
    "--model-format",
    type=click.Choice(["onnx", "skops"]),
    default="onnx",
    show_default=True,
    help="ensemble, objective: serve the three models as ONNX (converted with skl2onnx) or "
    "as scikit-learn skops files",
)
@click.option("--sweep", is_flag=True, help="also find each system's highest rate with p99<=SLO")
@click.option("--slo-ms", type=float, default=50.0, show_default=True, help="p99 objective")
@click.option("--sweep-start", type=float, default=250.0, show_default=True, help="first rate")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="draw latency CDFs and throughput curves to this PNG (needs the bench extra)",
)
@click.option("--models", default="digits-logreg,digits-forest", show_default=True)
@click.option(
    "--rows",
    type=int,
    default=2000,
    show_default=True,
    help="batching: rows per replica-level run at batch size 1",
)
@click.option(
    "--queries", type=int, default=2000, show_default=True, help="batching: queries per run"
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write all figures as JSON",
)
def bench(
    suite: str,
    systems: str,
    model: str,
    rate: float,
    duration: float,
    warmup: float,
    burst: int,
    arrivals: str,
    broker_warmup: float,
    workers: int | None,
    deadline_ms: int | None,
    feedback: bool,
    model_format: str,
    sweep: bool,
    slo_ms: float,
    sweep_start: float,
    plot_path: Path | None,
    models: str,
    rows: int,
    queries: int,
    out: Path | None,
) -> None:
    """Measure side by side in one run (starts the embedded broker if none is configured)."""
    from clipstream.streams.bench import run_bench
    from clipstream.streams.bench.compare import Plan
    from clipstream.streams.bench.ensemble import DEADLINES_MS, SUITES

    exit_on_sigterm()
    ensemble = suite in SUITES
    plan = Plan(
        systems=tuple(s for s in systems.split(",") if s),
        model=model,
        light_rate=rate,
        duration_s=duration,
        warmup_s=warmup,
        burst=burst,
        arrivals=arrivals,
        sweep=sweep,
        slo_ms=slo_ms,
        sweep_start=sweep_start,
        warm_broker_s=broker_warmup,
        workers=workers or (2 if ensemble else 1),
        deadline_ms=deadline_ms or DEADLINES_MS.get(suite, 1000),
        feedback=feedback,
        model_format=model_format,
    )
    sys.exit(
        run_bench(
            suite,
            plan=plan,
            models=[m for m in models.split(",") if m],
            rows=rows,
            queries=queries,
            out=out,
            plot_path=plot_path,
        )
    )
