"""``clipstream worker`` and ``clipstream replica``: the long-running serving processes."""

from __future__ import annotations

import logging

import click

from clipstream.streams.ops.cli.common import LOG_LEVELS, fail, free_port_option, settings_for

log = logging.getLogger("clipstream.cli")


@click.command()
@click.option("--partitions", type=int, default=None, help="partitions of the core topics")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0: a free one)")
@click.option(
    "--web-log-level",
    default=None,
    type=click.Choice(["crit", "error", "warn", "info", "debug"]),
    help="the log level of the worker's REST gateway web server, aiohttp (default: as --log-level)",
)
@click.option("--web-port", type=int, default=None, help="REST gateway port (0: a free one)")
@click.pass_context
def worker(
    ctx: click.Context,
    partitions: int | None,
    metrics_port: int | None,
    web_log_level: str | None,
    web_port: int | None,
) -> None:
    """Run a worker: intake, cache, batching, merge and learning, and the REST gateway."""
    free_port_option(metrics_port, "--metrics-port")
    free_port_option(web_port, "--web-port")
    settings = settings_for(partitions=partitions, metrics_port=metrics_port, web_port=web_port)
    from clipstream.models.control.registry import current
    from clipstream.streams.gateway.auth import GatewayConfigError
    from clipstream.streams.worker.process import run_worker

    if not current(settings).apps:  # also creates the core topics, as the worker would
        log.warning(
            "no app is registered yet: queries get an error prediction until one is "
            "(`clipstream app register NAME --models MODEL`); registrations apply at once"
        )
    try:
        run_worker(settings, web_log_level or LOG_LEVELS[ctx.parent.params["log_level"]])
    except GatewayConfigError as exc:
        fail(str(exc))


@click.command()
@click.option("--model", "model", required=True, help="the model this replica serves")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0: a free one)")
@click.option("--trust-pickle", is_flag=True, help="allow pickle/joblib model files")
@click.option(
    "--trusted-type",
    "trusted_types",
    multiple=True,
    help="a type a skops model file may load beyond sklearn/numpy/scipy (repeatable)",
)
def replica(
    model: str, metrics_port: int | None, trust_pickle: bool, trusted_types: tuple[str, ...]
) -> None:
    """Run one replica of a model (a member of its consumer group). Started before the model
    is deployed, it waits for the deploy."""
    from clipstream.models.replica import Replica, serve_forever
    from clipstream.streams.runtime import metrics

    free_port_option(metrics_port, "--metrics-port")
    settings = settings_for(
        metrics_port=metrics_port,
        trust_pickle=trust_pickle or None,
        trusted_types=",".join(trusted_types) or None,
    )
    port = metrics.serve(settings.metrics_port)
    logging.getLogger("clipstream.replica").warning("metrics on :%d", port)
    serve_forever(Replica(settings, model))
