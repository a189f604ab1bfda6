"""``clipstream model deploy|list|rollback`` and ``clipstream app register``: the control
plane's registry of model versions and apps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from clipstream.streams.ops.cli.common import UpperChoice, fail, settings_for


@click.group()
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
@click.option(
    "--compile",
    "compile_to",
    type=click.Choice(["onnx"]),
    default=None,
    help="convert a skops model with skl2onnx and serve the graph if it answers the same on "
    "sample rows (else say why and serve the file as it is)",
)
@click.option(
    "--compile-sample",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="rows to compare the compiled graph on (.npy or CSV); default: random rows",
)
def model_deploy(
    name: str,
    source: str,
    method: str,
    fmt: str,
    compile_to: str | None,
    compile_sample: Path | None,
    **opts: Any,
) -> None:
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
    if compile_to is not None:
        from clipstream.models.onnx_compile import compile_onnx

        if is_uri(source):
            fail("--compile needs a local model file, not a URI")
        try:
            compiled = compile_onnx(source, fmt, method, opts["input_dim"], sample=compile_sample)
        except (ValueError, OSError) as exc:
            fail(f"cannot compile {source}: {exc}")
        click.echo(compiled.explanation)
        source, fmt = compiled.path, compiled.fmt
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


@click.group()
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
