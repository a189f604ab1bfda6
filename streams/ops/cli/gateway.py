"""``clipstream gateway token``: bearer tokens for the REST gateway."""

from __future__ import annotations

from pathlib import Path

import click

from clipstream.streams.wire.config import Settings


@click.group()
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
