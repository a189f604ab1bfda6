"""Failures at the command line that need a broker to happen (issue 15): each is one line
on stderr naming what went wrong and what to do, exit code 1, found by trying the commands
as a new user would. The ones without a broker are in tests/unit/test_cli_errors.py; a
replica started too early and an error prediction are in test_start_order.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipstream.models.control import registry
from clipstream.streams.wire.config import Settings
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.integration


def one_line(settings: Settings, *args: str) -> str:
    done = run_cli(settings, *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0].removeprefix("error: ")


def test_a_query_nobody_answers_names_the_likely_causes(
    kafka_settings: Settings, digits_models: dict[str, tuple[Path, float]]
) -> None:
    s = kafka_settings
    broker = s.require_bootstrap()
    assert one_line(s, "query", "nosuchapp", "1,2,3", "--timeout", "2") == (
        "no prediction within 2 s: no worker is running (start one: `clipstream worker`); "
        "app 'nosuchapp' is not registered (`clipstream app register nosuchapp ...`); "
        f"the broker asked is {broker}"
    )
    registry.deploy_model(s, "slow-logreg", str(digits_models["digits-logreg"][0]))
    registry.register_app(s, "slow", ["slow-logreg"], deadline_ms=5000)
    assert one_line(s, "query", "slow", "1,2,3", "--timeout", "2") == (
        "no prediction within 2 s: no worker is running (start one: `clipstream worker`); "
        "app 'slow' answers by its deadline of 5000 ms, longer than --timeout 2 s; "
        f"the broker asked is {broker}"
    )


def test_registry_commands_refuse_in_one_line(
    kafka_settings: Settings, digits_models: dict[str, tuple[Path, float]]
) -> None:
    s = kafka_settings
    registry.deploy_model(s, "cli-logreg", str(digits_models["digits-logreg"][0]))
    register = ("app", "register", "cli-app", "--models")
    assert one_line(s, *register, "cli-logreg", "--policy", "exp3", "--gamma", "2") == (
        "app cli-app: gamma must be a number in [0, 1], got 2.0"
    )
    assert one_line(s, *register, "cli-logreg", "--eta", "0") == (
        "app cli-app: eta must be a number > 0, got 0.0"
    )
    assert one_line(s, *register, "cli-logreg,cli-logreg", "--policy", "EXP4") == (
        "app cli-app: models must be distinct names, got ['cli-logreg', 'cli-logreg']"
    )
    assert one_line(s, *register, "cli-logreg,other") == (
        "app cli-app: policy SINGLE takes exactly one model; use EXP3 or EXP4 for several"
    )
    assert one_line(s, *register, "nosuch", "--policy", "EXP3") == (
        "models not deployed: nosuch; deploy them first (`clipstream model deploy NAME SOURCE`)"
    )
    assert one_line(s, "model", "rollback", "nosuch") == "no model named 'nosuch' is deployed"
    assert one_line(s, "model", "rollback", "cli-logreg") == (
        "cli-logreg v1 has no earlier version to roll back to"
    )
    assert one_line(s, "model", "rollback", "cli-logreg", "--version", "7") == (
        "cli-logreg has no version 7; known: [1]"
    )
    assert one_line(s, "replay", "--app", "nosuch") == (
        "app 'nosuch' is not registered: register it first (`clipstream app register`)"
    )
    assert one_line(s, "status", "--metrics-url", "localhost:abc") == (
        "metrics endpoint 'http://localhost:abc' is not a URL: Port could not be cast to "
        "integer value as 'abc'"
    )
