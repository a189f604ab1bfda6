"""The ``clipstream`` command line.

Every failure a user can meet is one line on stderr saying what went wrong and what to do,
exit code 1 (2 for a usage error, as click does); ``--log-level debug`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

try:
    import click
    from rich.console import Console
    from rich.table import Table
except ModuleNotFoundError as missing:  # `pip install clipstream` is the SDK alone
    sys.exit(
        f"error: the clipstream command needs the server extra ({missing.name} is not "
        "installed): pip install 'clipstream[server]'"
    )

from clipstream.streams.ops.failures import Failure, check_kafka, explain
from clipstream.streams.runtime.ports import port_in_use
from clipstream.streams.wire.config import KAFKA_LOGGER, Settings
from clipstream.streams.wire.limits import MAX_DEADLINE_MS

log = logging.getLogger("clipstream.cli")
console = Console(stderr=True)  # progress; results go to stdout

#: the level --log-level chose (a traceback is printed at debug)
_level = logging.WARNING

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
    raise Failure(message)


def say_error(message: str) -> None:
    # click.secho, not rich: rich would wrap a long line at 80 columns when piped
    click.secho("error: ", fg="red", bold=True, err=True, nl=False)
    click.echo(message, err=True)


def free_port_option(port: int | None, flag: str) -> None:
    """A port flag naming a port that is taken fails here, before anything starts."""
    if not port:
        return
    if port_in_use(port, host=""):
        raise click.BadParameter(
            f"port {port} is in use; pick another, or 0 for a free one", param_hint=flag
        )


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


class UpperChoice(click.Choice):
    """Choices written in upper case (as --help shows them), accepted in any case."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return super().convert(value.upper() if isinstance(value, str) else value, param, ctx)


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


# -- broker -----------------------------------------------------------------------------


@main.group()
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


# -- serving processes ------------------------------------------------------------------


@main.command()
@click.option("--partitions", type=int, default=None, help="partitions of the core topics")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0: a free one)")
@click.option(
    "--faust-log-level",
    default=None,
    type=click.Choice(["crit", "error", "warn", "info", "debug"]),
    help="Faust's own logging (default: as --log-level)",
)
@click.option("--web-port", type=int, default=None, help="REST gateway port (0: a free one)")
@click.pass_context
def worker(
    ctx: click.Context,
    partitions: int | None,
    metrics_port: int | None,
    faust_log_level: str | None,
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
        run_worker(settings, faust_log_level or LOG_LEVELS[ctx.parent.params["log_level"]])
    except GatewayConfigError as exc:
        fail(str(exc))


@main.command()
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


@main.group()
def gateway() -> None:
    """Access to the REST gateway (docs/security.md)."""


@gateway.command("token")
@click.option(
    "--app",
    "scopes",
    multiple=True,
    required=True,
    help="an app the token may call: APP (predict and feedback), APP:predict, APP:feedback, "
    "or * for every app (repeatable)",
)
@click.option("--name", default=None, help="names the token in logs and 403s (default: random)")
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="append the hashed entry here (default: CLIPSTREAM_GATEWAY_TOKENS_FILE; unset: "
    "print it on stderr)",
)
def gateway_token(scopes: tuple[str, ...], name: str | None, tokens_file: Path | None) -> None:
    """Create a bearer token: prints the token (only now) and stores only its SHA-256 hash."""
    import os
    import secrets

    from clipstream.streams.gateway.auth import GatewayConfigError, make_entry, new_token

    token = new_token()
    try:
        entry = make_entry(name or f"token-{secrets.token_hex(4)}", token, list(scopes))
    except GatewayConfigError as exc:
        raise click.UsageError(str(exc)) from None  # a bad --name or --app
    path = tokens_file or Settings.from_env().gateway_tokens_file
    if path is None:
        # plain echo: rich would wrap the line
        click.echo(f"add to CLIPSTREAM_GATEWAY_TOKENS(_FILE):\n{entry.line()}", err=True)
    else:
        # created readable by its owner only; a worker re-reads it within a second
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(entry.line() + "\n")
        click.echo(f"token {entry.name!r} added to {path}", err=True)
    click.echo(token)


# -- registry ---------------------------------------------------------------------------


@main.group()
def model() -> None:
    """Deploy, list and roll back model versions."""


@model.command("deploy")
@click.argument("name")
@click.argument("source")
@click.option(
    "--method",
    default="predict_proba",
    show_default=True,
    type=click.Choice(["predict_proba", "predict", "decision_function"]),
    help="scikit-learn models: the method that answers (ONNX models answer with their outputs)",
)
@click.option(
    "--format",
    "fmt",
    default="skops",
    show_default=True,
    type=click.Choice(["skops", "onnx", "pickle", "joblib"]),
)
@click.option("--input-dim", type=int, default=None)
@click.option(
    "--nan-policy",
    default="reject",
    show_default=True,
    type=click.Choice(["reject", "allow", "zero"]),
    help="rows with NaN or inf",
)
@click.option("--partitions", type=int, default=None, help="partitions of its requests topic")
@click.option("--batch-max", type=int, default=None)
@click.option("--batch-wait-ms", type=float, default=None)
@click.option("--latency-slo-ms", type=float, default=None, help="AIMD latency objective")
@click.option(
    "--sha256",
    default=None,
    help="the digest the file must have; for a URI, saves reading it once to compute it",
)
def model_deploy(name: str, source: str, method: str, fmt: str, **opts: Any) -> None:
    """Deploy SOURCE as the next version of NAME and serve it. SOURCE is a local file, whose
    bytes are uploaded to the cluster (topic clipstream.artifacts), or a URI that replicas
    download (s3://, gs://, https://, file://); either way replicas check its SHA-256."""
    from clipstream.models.control.artifacts import is_uri
    from clipstream.models.control.registry import RegistryError, deploy_model

    if not is_uri(source):
        path = Path(source)
        if not path.exists() or path.is_dir():
            fail(f"no model file at {source}")
        source = str(path.resolve())
    try:
        spec = deploy_model(settings_for(), name, source, method=method, fmt=fmt, **opts)
    except RegistryError as exc:
        fail(str(exc))
    serving = spec["versions"][-1]
    size = "" if serving["size"] is None else f", {serving['size']:,} bytes"
    click.echo(f"{name} v{spec['version']} serving (sha256 {serving['digest']}{size})")


@model.command("rollback")
@click.argument("name")
@click.option("--version", type=int, default=None, help="default: the one before the current")
def model_rollback(name: str, version: int | None) -> None:
    """Serve an earlier version of NAME again."""
    from clipstream.models.control.registry import RegistryError, rollback_model

    try:
        spec = rollback_model(settings_for(), name, version)
    except RegistryError as exc:
        fail(str(exc))
    click.echo(f"{name} v{spec['version']} serving")


@model.command("list")
@click.option("--json", "as_json", is_flag=True)
def model_list(as_json: bool) -> None:
    """List models, their versions, and apps."""
    from clipstream.models.control.registry import current

    registry = current(settings_for())
    if as_json:
        click.echo(json.dumps({"models": registry.models, "apps": registry.apps}, indent=2))
        return
    table = Table("model", "serving", "versions", "method", "format", "sha256", "size", "source")
    for name, spec in sorted(registry.models.items()):
        serving = registry.version_spec(name) or {}
        stored = serving.get("artifact")
        table.add_row(
            name,
            f"v{spec['version']}",
            ", ".join(f"v{v['version']}" for v in spec["versions"]),
            serving.get("method", ""),
            serving.get("format", ""),
            (serving.get("digest") or "-")[:12],
            "-" if serving.get("size") is None else f"{serving['size']:,}",
            f"{stored['topic']} ({serving['path']})" if stored else serving.get("path", ""),
        )
    Console().print(table)
    apps = Table("app", "policy", "models", "deadline ms", "default")
    for name, spec in sorted(registry.apps.items()):
        apps.add_row(
            name,
            spec["policy"],
            ", ".join(spec["models"]),
            f"{spec['deadline_ms']:g}",
            str(spec["default_label"]),
        )
    Console().print(apps)


@main.group()
def app() -> None:
    """Register applications."""


@app.command("register")
@click.argument("name")
@click.option("--models", required=True, help="comma-separated model names")
@click.option(
    "--policy",
    default="SINGLE",
    show_default=True,
    type=UpperChoice(["SINGLE", "EXP3", "EXP4"]),
)
@click.option("--deadline-ms", type=float, default=100.0, show_default=True)
@click.option("--default-label", default=None, help="output when no model answers in time")
@click.option("--personalised", is_flag=True, help="selection state per user/context")
@click.option("--input-dim", type=int, default=None)
@click.option("--eta", type=float, default=0.1, show_default=True, help="learning rate")
@click.option("--gamma", type=float, default=0.05, show_default=True, help="Exp3 exploration")
@click.option("--no-cache", is_flag=True, help="do not use the prediction cache")
def app_register(name: str, models: str, no_cache: bool, **opts: Any) -> None:
    """Register (or update) app NAME with its candidate models and policy."""
    from clipstream.models.control.registry import RegistryError, register_app

    try:
        register_app(
            settings_for(),
            name,
            [m.strip() for m in models.split(",") if m.strip()],
            cache=not no_cache,
            **opts,
        )
    except RegistryError as exc:
        fail(str(exc))
    click.echo(f"app {name} registered")


@main.command()
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


# -- data -------------------------------------------------------------------------------


@main.command()
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


@main.command()
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


@main.command()
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


@main.command()
@click.option("--rate", type=float, default=150.0, show_default=True, help="queries per second")
@click.option("--replicas", type=int, default=1, show_default=True, help="replicas per model")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def demo(rate: float, replicas: int, workdir: Path | None) -> None:
    """Train digits models, serve them, stream the test set with feedback, summarise."""
    from clipstream.streams.ops.demo import run_demo

    exit_on_sigterm()
    sys.exit(run_demo(rate=rate, replicas=replicas, workdir=workdir))


@main.command()
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


if __name__ == "__main__":
    main()
