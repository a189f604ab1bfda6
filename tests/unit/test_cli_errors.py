"""Every failure at the command line is one line on stderr, what went wrong and what to do,
with exit code 1 (2 for a usage error); ``--log-level debug`` adds the traceback (issue 15).
The paths here need no broker: no cluster configured, one that does not answer, bad flags.
Paths that need a broker are in tests/integration/test_cli_errors_live.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clipstream.streams.ops import cli
from clipstream.streams.ops.cli import status
from clipstream.streams.ops.cli.common import UpperChoice

NO_CLUSTER = (
    "error: no Kafka cluster configured: set KAFKA_BOOTSTRAP_SERVERS or run "
    "`clipstream broker start`"
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.skops"
    path.write_bytes(b"not really a model")
    return path


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port  # closed: connections are refused


def run(args: list[str], env: dict[str, str | None]) -> Result:
    return CliRunner().invoke(cli.main, args, env=env, prog_name="clipstream")


def one_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def no_cluster_env(tmp_path: Path) -> dict[str, str | None]:
    # no variable and no broker recorded by `clipstream broker start`
    return {"KAFKA_BOOTSTRAP_SERVERS": None, "CLIPSTREAM_STATE_DIR": str(tmp_path)}


COMMANDS = [
    ["worker"],
    ["replica", "--model", "m"],
    ["query", "digits", "1,2,3"],
    ["feedback", "q1", "digits", "--label", "0"],
    ["status"],
    ["model", "list"],
    ["model", "deploy", "m", "MODEL_FILE"],
    ["model", "rollback", "m"],
    ["app", "register", "digits", "--models", "m"],
    ["replay", "--app", "digits"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a[:2]) for a in COMMANDS])
def test_without_a_cluster_every_command_says_so_in_one_line(
    args: list[str], tmp_path: Path, model_file: Path
) -> None:
    args = [str(model_file) if a == "MODEL_FILE" else a for a in args]
    result = run(args, no_cluster_env(tmp_path))
    assert result.exit_code == 1
    assert one_line(result) == NO_CLUSTER
    assert result.stdout == ""


@pytest.mark.parametrize("args", COMMANDS[:4], ids=[" ".join(a[:2]) for a in COMMANDS[:4]])
def test_a_cluster_that_does_not_answer_fails_at_once_in_one_line(
    args: list[str], closed_port: int
) -> None:
    result = run(args, {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port}"})
    assert result.exit_code == 1
    assert one_line(result) == (
        f"error: cannot reach Kafka at 127.0.0.1:{closed_port}: Connect to "
        f"ipv4#127.0.0.1:{closed_port} failed: Connection refused; is "
        "KAFKA_BOOTSTRAP_SERVERS right and the cluster up?"
    )


def test_debug_level_adds_the_traceback(tmp_path: Path) -> None:
    result = run(["--log-level", "debug", "status"], no_cluster_env(tmp_path))
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1] == NO_CLUSTER


def test_a_bug_is_one_line_that_asks_for_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**overrides: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(status, "settings_for", broken)  # where `clipstream status` finds it
    result = run(["status"], no_cluster_env(tmp_path))
    assert result.exit_code == 1
    assert one_line(result) == (
        "error: unexpected KeyError: 'surprise' (a bug? run again with --log-level debug "
        "and report the traceback)"
    )


USAGE = [
    (["query", "digits", "1,x"], "Invalid value for FEATURES: must be comma-separated numbers"),
    (["query", "digits", "1", "--timeout", "0"], "Invalid value for '--timeout'"),
    (["feedback", "q1", "digits"], "give --label or --reward"),
    (["feedback", "q1", "digits", "--reward", "2"], "Invalid value for '--reward'"),
    (["app", "register", "a", "--models", "m", "--policy", "greedy"], "'GREEDY' is not one of"),
    (["status", "--window", "-1"], "Invalid value for '--window'"),
    (["replay", "--app", "a", "--from-offset", "3", "--from-time", "0"], "at most one of"),
    (["replay", "--app", "a", "--from-time", "yesterday"], "Invalid value for --from-time"),
    (["replay"], "Missing option '--app'"),
    (["nosuch"], "No such command 'nosuch'"),
]


@pytest.mark.parametrize(("args", "says"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line_with_exit_code_2(
    args: list[str], says: str, tmp_path: Path
) -> None:
    result = run(args, no_cluster_env(tmp_path))
    assert result.exit_code == 2
    line = one_line(result)
    assert says in line
    assert line.endswith("--help`)")  # what to do: the command's help


def test_a_missing_model_file_is_one_line(tmp_path: Path) -> None:
    result = run(["model", "deploy", "m", "/no/such/file"], no_cluster_env(tmp_path))
    assert result.exit_code == 1
    assert one_line(result) == "error: no model file at /no/such/file"


def test_a_port_flag_naming_a_taken_port_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (["worker", "--metrics-port", str(port)], ["worker", "--web-port", str(port)]):
            result = run(args, no_cluster_env(tmp_path))
            assert result.exit_code == 2
            assert f"port {port} is in use; pick another, or 0 for a free one" in one_line(result)


def test_a_bad_feedback_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_text('{"query_id": "q1", "app": "digits", "label": "3"}\n\n{"query_id": "q2"\n')
    result = run(["replay", "--app", "digits", "--file", str(path)], no_cluster_env(tmp_path))
    assert result.exit_code == 1
    assert one_line(result).startswith(f"error: {path}, line 3: not JSON")
    path.write_text('{"query_id": "q1", "app": "digits", "label": [3]}\n')
    result = run(["replay", "--app", "digits", "--file", str(path)], no_cluster_env(tmp_path))
    assert one_line(result) == f'error: {path}, line 1: "label" must be a string or a number'


def test_policy_help_shows_the_choices_as_they_are_written() -> None:
    result = CliRunner().invoke(cli.main, ["app", "register", "--help"])
    assert result.exit_code == 0
    (line,) = [x for x in result.stdout.splitlines() if "--policy" in x]
    assert "[SINGLE|EXP3|EXP4]" in line and "[default: SINGLE]" in line
    choice = UpperChoice(["SINGLE", "EXP3", "EXP4"])
    assert choice.convert("exp4", None, None) == "EXP4"
