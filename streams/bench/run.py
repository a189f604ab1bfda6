"""Entry point of ``clipstream bench``: pick the suite, show progress, write the results."""

from __future__ import annotations

import contextlib
import datetime as dt
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from clipstream.streams.bench import ensemble, report
from clipstream.streams.bench.compare import Plan, Progress, run_compare
from clipstream.streams.ops.demo import kafka
from clipstream.streams.wire.config import Settings

console = Console(stderr=True)
# the result tables go to stdout; written to a file or a pipe they keep their columns
tables = Console(width=None if sys.stdout.isatty() else 200)


def run_bench(
    suite: str = "compare",
    *,
    plan: Plan | None = None,
    models: list[str] | None = None,
    rows: int = 2000,
    queries: int = 2000,
    out: Path | None = None,
    plot_path: Path | None = None,
    workdir: Path | None = None,
) -> int:
    if suite in ("batching", "selection"):
        from clipstream.streams.bench.suites import run_suite

        return run_suite(suite, models or ["digits-logreg", "digits-forest"], rows, queries, out)
    if suite in ensemble.SUITES:
        return _run_ensemble(suite, plan or Plan(), out, workdir)
    if suite != "compare":
        raise ValueError(f"unknown suite {suite!r}")
    plan = plan or Plan()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="clipstream-bench-"))
    with progress_bar() as progress, kafka(Settings.from_env(), workdir, peak=True) as settings:
        figures = run_compare(settings, workdir, plan, progress, console.print)
    out = _write(figures, out or workdir / "bench.json")
    tables.print(report.table(figures))
    tables.print(report.hops_table(figures))
    tables.print(report.cpu_table(figures))
    for extra in (report.workers_table(figures), report.sweep_table(figures)):
        if extra is not None:
            tables.print(extra)
    for name, why in figures["skipped"].items():
        console.print(f"[yellow]{name} not measured: {why}")
    if "clipstream-cache" in figures["systems"]:
        rate = figures["systems"]["clipstream-cache"]["cache_hit_rate"]
        console.print(f"clipstream-cache: measured cache hit rate {rate:.1%} during the burst")
    console.print(f"all figures and latency histograms: {out}")
    if plot_path is not None:
        from clipstream.streams.bench.plot import plot

        console.print(f"plot: {plot(figures, plot_path)}")
    print(report.summary_line(figures), flush=True)
    # the exit status speaks for clipstream, like the summary line; another system's
    # losses are a finding of the run, reported in the table and the JSON
    ours = figures["systems"].get("clipstream")
    if ours is None:
        return 0 if "clipstream" not in plan.systems else 1
    return 0 if ours["light"].lost + ours["capacity"].lost == 0 else 1


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    """One bar per phase: queries sent and answered."""
    columns = (
        TextColumn("{task.description:32s}"),
        BarColumn(),
        TextColumn("sent {task.fields[sent]:>7}  answered {task.fields[got]:>7}"),
        TimeElapsedColumn(),
    )
    with ProgressBar(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, total: int, sent: int, got: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(
                    phase, total=total if total > 0 else None, sent=0, got=0
                )
            bar.update(tasks[phase], completed=got, sent=sent, got=got)

        yield progress


def _write(figures: dict, out: Path) -> Path:
    figures["command"] = "clipstream bench " + shlex.join(sys.argv[2:])
    figures["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report.write_json(figures, out)
    return out


def _run_ensemble(suite: str, plan: Plan, out: Path | None, workdir: Path | None) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="clipstream-bench-"))
    with progress_bar() as progress, kafka(Settings.from_env(), workdir, peak=True) as settings:
        figures = ensemble.run_ensemble(settings, workdir, suite, plan, progress)
    out = _write(figures, out or workdir / "bench.json")
    tables.print(ensemble.sweep_table(figures))
    if "feedback" in figures:
        tables.print(ensemble.feedback_table(figures))
    console.print(f"all figures: {out}")
    print(ensemble.summary_line(figures), flush=True)
    lost = sum(p.lost for p in figures["sweep"])
    return 0 if lost == 0 else 1
