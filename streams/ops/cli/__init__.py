"""The ``clipstream`` command line: the root group, its --log-level, and the one-line errors.

Every failure a user can meet is one line on stderr saying what went wrong and what to do,
exit code 1 (2 for a usage error, as click does); ``--log-level debug`` adds the traceback.
The commands live in one module per group (broker, serve, gateway, control, client, status,
replay, demo, bench); each imports what is heavy (numpy, scikit-learn, the Kafka admin
client...) inside the command, so ``clipstream --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

try:
    import click
    import rich  # noqa: F401 -- the commands print with it; missing means no server extra
except ModuleNotFoundError as missing:  # `pip install clipstream` is the SDK alone
    sys.exit(
        f"error: the clipstream command needs the server extra ({missing.name} is not "
        "installed): pip install 'clipstream[server]'"
    )

from clipstream.streams.ops.cli import (
    bench,
    broker,
    client,
    control,
    demo,
    gateway,
    replay,
    serve,
    status,
)
from clipstream.streams.ops.cli.common import LOG_LEVELS
from clipstream.streams.ops.failures import explain
from clipstream.streams.wire.config import KAFKA_LOGGER

#: the level --log-level chose (a traceback is printed at debug)
_level = logging.WARNING


def say_error(message: str) -> None:
    """``error: message`` on stderr, the prefix in bold red."""
    # click.secho, not rich: rich would wrap a long line at 80 columns when piped
    click.secho("error: ", fg="red", bold=True, err=True, nl=False)
    click.echo(message, err=True)


class Cli(click.Group):
    """The top-level group: turns every exception into one line on stderr."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:  # a caller that handles click's exceptions itself
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # a group without a command: its help
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            say_error(exc.format_message() + where)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            say_error(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            say_error("interrupted")
            sys.exit(130)
        except Exception as exc:
            if _level <= logging.DEBUG:
                traceback.print_exception(exc)
            say_error(explain(exc))
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Cli)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(list(LOG_LEVELS)),
    help="also of librdkafka, whose warnings (it retries what they report) show from info; "
    "debug also prints a failure's traceback",
)
def main(log_level: str) -> None:
    """clipstream: low-latency prediction serving over Kafka."""
    global _level
    _level = getattr(logging, log_level.upper())
    logging.basicConfig(level=_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kafka = _level if _level < logging.WARNING else max(_level, logging.ERROR)
    logging.getLogger(KAFKA_LOGGER).setLevel(kafka)


# --help lists commands by name, so the order here is only the order of the modules
for command in (
    broker.broker,
    serve.worker,
    serve.replica,
    gateway.gateway,
    control.model,
    control.app,
    status.status,
    client.query,
    client.feedback,
    replay.replay,
    demo.demo,
    bench.bench,
):
    main.add_command(command)
