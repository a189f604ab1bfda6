"""``clipstream demo``: train digits models, serve them and stream the test set through."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipstream.streams.ops.cli.common import exit_on_sigterm


@click.command()
@click.option("--rate", type=float, default=150.0, show_default=True, help="queries per second")
@click.option("--replicas", type=int, default=1, show_default=True, help="replicas per model")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def demo(rate: float, replicas: int, workdir: Path | None) -> None:
    """Train digits models, serve them, stream the test set with feedback, summarise."""
    from clipstream.streams.ops.demo import run_demo

    exit_on_sigterm()
    sys.exit(run_demo(rate=rate, replicas=replicas, workdir=workdir))
