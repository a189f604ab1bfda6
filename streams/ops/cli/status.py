"""``clipstream status``: apps, models, replicas, lag and latency, from the cluster and the
processes' Prometheus endpoints."""

from __future__ import annotations

import json

import click
from rich.console import Console

from clipstream.streams.ops.cli.common import settings_for
from clipstream.streams.ops.failures import Failure


@click.command()
@click.option(
    "--metrics-url",
    "urls",
    multiple=True,
    help="a process's Prometheus endpoint, e.g. http://host:9400 (repeat; adds to "
    "CLIPSTREAM_METRICS_URLS)",
)
@click.option(
    "--window",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="seconds between two scrapes: latency and counts of that window (0: since start)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def status(urls: tuple[str, ...], window: float, as_json: bool) -> None:
    """Apps, models, replicas and lag, batch sizes, cache hits, latency and weights."""
    from urllib.parse import urlsplit

    from clipstream.streams.ops.status import collect_status, metrics_urls, render

    settings = settings_for()
    endpoints = metrics_urls(settings, urls)
    for url in endpoints:
        try:
            urlsplit(url).port  # noqa: B018 -- parsing it is the check
        except ValueError as exc:
            raise Failure(f"metrics endpoint {url!r} is not a URL: {exc}") from None
    report = collect_status(settings, endpoints, window)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    out = Console()
    for table in render(report):
        out.print(table)
