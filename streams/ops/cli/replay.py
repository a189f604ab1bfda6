"""``clipstream replay``: rebuild an app's selection state from its feedback, with progress."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from clipstream.streams.ops.cli.common import settings_for
from clipstream.streams.ops.failures import Failure

console = Console(stderr=True)  # progress; results go to stdout


@click.command()
@click.option("--app", "app_name", required=True, help="the app whose feedback is replayed")
@click.option(
    "--from-offset",
    type=click.IntRange(min=0),
    default=None,
    help="start at this offset of every feedback partition (default: the beginning)",
)
@click.option(
    "--from-time",
    default=None,
    help="start at the first feedback at or after this time: ISO 8601 "
    "(2026-11-23T12:00:00, UTC unless it names a zone) or epoch milliseconds",
)
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='replay a file of feedback records instead, one JSON object a line: {"query_id", '
    '"app", "label" or "reward"}, against the answers on the predictions topic',
)
@click.option("--into", default=None, help="install the state into this app (default: --app)")
@click.option(
    "--dry-run", is_flag=True, help="print the weights it would install next to the live ones"
)
def replay(
    app_name: str,
    from_offset: int | None,
    from_time: str | None,
    path: Path | None,
    into: str | None,
    dry_run: bool,
) -> None:
    """Rebuild an app's selection state from its feedback and install it. Replay computes
    from scratch, so running it twice installs the same state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from clipstream.models.control.registry import current
    from clipstream.streams.learning import replay as replaying
    from clipstream.streams.ops.replay_view import RateColumn, weights_table

    if sum(x is not None for x in (from_offset, from_time, path)) > 1:
        raise click.UsageError("give at most one of --from-offset, --from-time and --file")
    from_time_ms = None if from_time is None else parse_time_ms(from_time)
    records = None
    if path is not None:
        try:
            records = replaying.check_feedback_file(path)
        except replaying.FeedbackFileError as exc:
            raise Failure(str(exc)) from None
    settings = settings_for()
    target = into or app_name
    if current(settings).app(target) is None:
        raise Failure(
            f"app {target!r} is not registered: register it first (`clipstream app register`)"
        )
    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("feedback records", total=records)
        states, counts = replaying.replay(
            settings,
            app_name,
            into=into,
            from_offset=from_offset,
            from_time_ms=from_time_ms,
            file=path,
            dry_run=dry_run,
            on_progress=lambda n: progress.advance(task, n),
            on_total=lambda n: progress.update(task, total=n),
        )
        progress.update(task, completed=progress.tasks[0].total)
    if dry_run:
        Console().print(weights_table(replaying.live_states(settings, target), states))
    summary = " ".join(f"{k}={v}" for k, v in counts.items())
    installed = "false (dry run)" if dry_run else "true"
    click.echo(f"replay: app={target} states={len(states)} {summary} installed={installed}")


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds from ISO 8601 or from a number of milliseconds."""
    from datetime import UTC, datetime

    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            "expected ISO 8601 (2026-11-23T12:00:00+00:00) or epoch milliseconds",
            param_hint="--from-time",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
