"""``clipstream broker start|stop|status``: the embedded dev broker, run in the background."""

from __future__ import annotations

import json
import sys

import click

from clipstream.streams.ops.cli.common import fail


@click.group()
def broker() -> None:
    """The embedded single-node Kafka broker for development, tests and the demo."""


@broker.command("start")
@click.option("--port", type=int, default=None, help="listener port (default: a free one)")
def broker_start(port: int | None) -> None:
    """Start a broker in the background (or report the one already running)."""
    from clipstream.streams.broker import BrokerError, start_detached

    try:
        state = start_detached(port=port)
    except BrokerError as exc:
        fail(str(exc))
    click.echo(f"KAFKA_BOOTSTRAP_SERVERS={state['bootstrap']}")


@broker.command("stop")
def broker_stop() -> None:
    """Stop the background broker."""
    from clipstream.streams.broker import stop_detached

    click.echo("stopped" if stop_detached() else "no broker was running")


@broker.command("status")
def broker_status() -> None:
    """Show whether the background broker is running."""
    from clipstream.streams.broker import status_detached

    state = status_detached()
    if state is None:
        click.echo("not running")
        sys.exit(1)
    click.echo(json.dumps(state))
