"""What the ``clipstream`` commands share: their settings (the environment, else the broker
``clipstream broker start`` left running), one-line failures, port and choice checks, and
SIGTERM handling."""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

import click

from clipstream.streams.ops.failures import Failure, check_kafka
from clipstream.streams.runtime.ports import port_in_use
from clipstream.streams.wire.config import Settings

#: --log-level's choices, each with its spelling among --web-log-level's (the worker's default)
LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}


def settings_for(**overrides: Any) -> Settings:
    """Settings from the environment; without KAFKA_BOOTSTRAP_SERVERS, the broker that
    ``clipstream broker start`` left running. Fails at once, in one line, when there is no
    cluster or it does not answer."""
    settings = Settings.from_env(**overrides)
    hint = "is KAFKA_BOOTSTRAP_SERVERS right and the cluster up?"
    if not settings.bootstrap:
        from clipstream.streams.broker import status_detached

        state = status_detached()
        if state is None:
            raise Failure(
                "no Kafka cluster configured: set KAFKA_BOOTSTRAP_SERVERS or run "
                "`clipstream broker start`"
            )
        settings.bootstrap = state["bootstrap"]
        hint = "run `clipstream broker start` again"
    check_kafka(settings, hint)
    return settings


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the finally-blocks that stop child processes and
    the embedded broker run (Python's default SIGTERM ends the process without them)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def fail(message: str) -> NoReturn:
    """End the command with ``message`` as its one line on stderr, exit code 1."""
    raise Failure(message)


def free_port_option(port: int | None, flag: str) -> None:
    """A port flag naming a port that is taken fails here, before anything starts."""
    if not port:
        return
    if port_in_use(port, host=""):
        raise click.BadParameter(
            f"port {port} is in use; pick another, or 0 for a free one", param_hint=flag
        )


class UpperChoice(click.Choice):
    """Choices written in upper case (as --help shows them), accepted in any case."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return super().convert(value.upper() if isinstance(value, str) else value, param, ctx)
