"""``clipstream query`` and ``clipstream feedback``: one query or one feedback record, sent
the way an app would (through the SDK)."""

from __future__ import annotations

import json

import click

from clipstream.streams.ops.cli.common import settings_for
from clipstream.streams.ops.failures import Failure
from clipstream.streams.wire.limits import MAX_DEADLINE_MS


@click.command()
@click.argument("app_name")
@click.argument("features")
@click.option("--user", default=None)
@click.option("--deadline-ms", type=click.IntRange(1, MAX_DEADLINE_MS), default=None)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    default=10.0,
    show_default=True,
    help="seconds to wait for the prediction",
)
@click.option("--query-id", default=None, help="the query's id (default: a random one)")
def query(
    app_name: str,
    features: str,
    user: str | None,
    deadline_ms: int | None,
    timeout: float,
    query_id: str | None,
) -> None:
    """Send one query (FEATURES comma-separated) and print its prediction as JSON."""
    from concurrent.futures import TimeoutError as NoAnswer

    from clipstream.streams.ops.failures import no_prediction
    from clipstream.streams.sdk import Predictor

    try:
        vector = [float(x) for x in features.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            "must be comma-separated numbers, e.g. 0,1.5,3", param_hint="FEATURES"
        ) from None
    settings = settings_for()
    with Predictor(settings) as predictor:
        future = predictor.submit(
            app_name, vector, query_id=query_id, user=user, deadline_ms=deadline_ms
        )
        try:
            prediction = future.result(timeout)
        except NoAnswer:
            raise no_prediction(settings, app_name, timeout) from None
    click.echo(json.dumps(prediction))
    if prediction.get("error"):
        raise Failure(f"the worker answered with an error: {prediction['error']}")


@click.command()
@click.argument("query_id")
@click.argument("app_name")
@click.option("--label", default=None, help="the true label")
@click.option("--reward", type=click.FloatRange(0.0, 1.0), default=None, help="a reward in [0, 1]")
@click.option("--user", default=None)
def feedback(
    query_id: str, app_name: str, label: str | None, reward: float | None, user: str | None
) -> None:
    """Send feedback (the true label or a reward) for an earlier query."""
    from clipstream.streams.sdk import Client

    if label is None and reward is None:
        raise click.UsageError("give --label or --reward")
    client = Client(settings_for())
    client.send_feedback(query_id, app_name, label=label, reward=reward, user=user)
    client.flush()
    click.echo("sent")
