"""docs/configuration.md is generated from the code: every field of wire.config.Settings
(its environment variable and default) and every option of every `clipstream` command.
The descriptions of settings are the only hand-written part; they are kept across
regeneration. After changing a setting or a flag, regenerate and fill in any TODO:

    .venv/bin/python -m tests.unit.test_config_docs
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from clipstream.streams.ops.cli import main
from clipstream.streams.wire.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
TODO = "TODO: describe"

HEADER = """# Configuration reference

Generated from `streams/wire/config.py` and the `clipstream` commands by
`.venv/bin/python -m tests.unit.test_config_docs`; `tests/unit/test_config_docs.py` fails
when this page and the code disagree. Only the descriptions of the settings are written
by hand.

## Settings (environment variables)

Every process reads these at start-up. A command-line flag of the same name (listed in
the last column) overrides the variable for that process.

| variable | default | flags that override it | what it does |
|---|---|---|---|
"""

MIDDLE = """
`Settings.extra` (a dict of librdkafka properties) is set only from Python, for
configuration the fields above do not cover.

## Commands and their flags

`clipstream --help` and `clipstream COMMAND --help` print the same text.
"""

# Descriptions of settings added on other branches, used until the page has its own
# (regenerating copies them into the page; then they can go).
PENDING = {
    "CLIPSTREAM_DEDUP": "On partition assignment a worker reads back which queries of its new "
    "partitions were already answered (from the predictions topic), so redelivered queries "
    "are not answered twice. Off only to measure what it costs.",
    "CLIPSTREAM_TRUSTED_TYPES": "Comma-separated types a skops model file may load beyond "
    "scikit-learn, numpy and scipy (a replica's `--trusted-type`, repeatable).",
}

# Options whose name matches a setting but which set something else.
NOT_THE_SETTING = {("clipstream model deploy", "partitions")}


def env_name(field_name: str) -> str:
    return (
        "KAFKA_BOOTSTRAP_SERVERS" if field_name == "bootstrap" else ENV_PREFIX + field_name.upper()
    )


def settings_fields() -> list[Any]:
    return [f for f in fields(Settings) if f.name != "extra"]


def commands(group: click.Group = main, path: str = "clipstream") -> list[tuple[str, Any]]:
    """Every command, depth first, with its full name; the group itself first."""
    out: list[tuple[str, Any]] = [(path, group)]
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            out.extend(commands(command, f"{path} {name}"))
        else:
            out.append((f"{path} {name}", command))
    return out


def options(command: Any) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


def overriding_flags() -> dict[str, list[str]]:
    """Setting name -> 'command --flag' of every option that overrides it."""
    names = {f.name for f in settings_fields()}
    out: dict[str, list[str]] = {}
    for path, command in commands():
        for option in options(command):
            if option.name in names and (path, option.name) not in NOT_THE_SETTING:
                out.setdefault(option.name, []).append(f"`{path} {option.opts[0]}`")
    return out


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def existing_descriptions() -> dict[str, str]:
    if not DOC.exists():
        return {}
    found = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([A-Z_]+)` \|.*\| ([^|]*(?:\\\|[^|]*)*) \|$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def default_text(value: Any) -> str:
    if value is None or value == "":
        return "(unset)"
    return f"`{value}`"


def render() -> str:
    described = existing_descriptions()
    flags = overriding_flags()
    lines = [HEADER.rstrip("\n")]
    for f in settings_fields():
        env = env_name(f.name)
        default = f.default if f.default is not MISSING else None
        lines.append(
            f"| `{env}` | {default_text(default)} | {', '.join(flags.get(f.name, [])) or '-'} "
            f"| {described.get(env, PENDING.get(env, TODO))} |"
        )
    lines.append(MIDDLE.rstrip("\n"))
    for path, command in commands():
        lines.append(f"\n### `{path}`\n")
        lines.append(cell(command.help or "").split(". ")[0].rstrip(".") + ".")
        usage = " ".join(command.collect_usage_pieces(click.Context(command)))
        lines.append(f"\nUsage: `{path} {usage}`")
        opts = options(command)
        if not opts:
            continue
        lines.append("\n| flag | default | meaning |")
        lines.append("|---|---|---|")
        for option in opts:
            names = ", ".join(f"`{o}`" for o in [*option.opts, *option.secondary_opts])
            if option.required:
                default = "required"
            elif option.is_flag:
                default = "off"
            elif option.multiple:
                default = "(none)"
            else:
                default = default_text(option.default)
            meaning = cell(option.help or "")
            if isinstance(option.type, click.Choice):
                meaning = (
                    (meaning.rstrip(".") + ". " if meaning else "")
                    + "One of "
                    + ", ".join(f"`{c}`" for c in option.type.choices)
                    + "."
                )
            lines.append(f"| {names} | {default} | {meaning or '-'} |")
    return "\n".join(lines) + "\n"


def test_configuration_page_matches_the_code() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is out of date: run "
        "`.venv/bin/python -m tests.unit.test_config_docs` and describe any new setting"
    )


def test_every_setting_is_described_and_read_from_its_variable(monkeypatch) -> None:
    text = DOC.read_text()
    assert TODO not in text, "describe the new settings in docs/configuration.md"
    for f in settings_fields():
        assert f"`{env_name(f.name)}`" in text
    # the variable the page names is the one Settings reads
    monkeypatch.setenv("CLIPSTREAM_WEB_PORT", "7001")
    monkeypatch.setenv("CLIPSTREAM_METRICS_URLS", "a:1,b:2")
    settings = Settings.from_env()
    assert (settings.web_port, settings.metrics_urls) == (7001, "a:1,b:2")


if __name__ == "__main__":
    DOC.write_text(render())
    missing = sorted(set(re.findall(r"`([A-Z_]+)` \|[^\n]*" + TODO, DOC.read_text())))
    print(f"wrote {DOC}" + (f"; describe: {missing}" if missing else ""))
