"""`clipstream replay` on the command line against a real worker (issue 13): the dry run
prints the replayed weights next to the live ones from the selection changelog, a replay
installs its state in the worker, running it twice installs the same state, and every
source works: the whole topic, an offset, a time, a file."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.learning.replay import live_states, replay
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import Child
from clipstream.streams.sdk import Predictor
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import read_to_end, run_cli

pytestmark = pytest.mark.integration

APP = "digits"
MODELS = ["digits-logreg", "digits-tree"]
QUERIES = 60


def snapshots_installed(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "clipstream_feedback_total" and sample.labels == {
                "app": APP,
                "result": "snapshot",
            }:
                return sample.value
    return 0.0


def summary(stdout: str) -> str:
    (line,) = [x for x in stdout.splitlines() if x.startswith("replay: ")]
    return line


@pytest.mark.timeout(600)
def test_replay_from_the_command_line(
    kafka_settings: Settings,
    digits_models: dict[str, tuple[Path, float]],
    processes: Callable[..., Child],
    tmp_path: Path,
) -> None:
    s = kafka_settings
    for name in MODELS:
        registry.deploy_model(s, name, str(digits_models[name][0]), input_dim=64)
    registry.register_app(s, APP, MODELS, policy="EXP4", deadline_ms=30000, eta=0.5)
    port = free_port()
    processes("worker", "worker", "--metrics-port", str(port))
    for name in MODELS:
        processes(name, "replica", "--model", name)

    _, X_test, _, y_test = digits_split()
    feedback = []
    with Predictor(s) as predictor:
        for x, y in zip(X_test[:QUERIES], y_test[:QUERIES], strict=True):
            prediction = predictor.predict(APP, x.tolist(), timeout=120)
            assert not prediction["default"], prediction
            predictor.client.send_feedback(prediction["query_id"], APP, label=str(y))
            feedback.append({"query_id": prediction["query_id"], "app": APP, "label": str(y)})
        predictor.client.flush()
    after_feedback = time.time()

    def learned() -> dict | None:
        state = live_states(s, APP).get(APP)
        return state.to_state() if state is not None and state.updates == QUERIES else None

    live = wait_for(learned, 120, "the worker to apply every feedback record")

    # the dry run: replayed from the whole topic, next to the live weights; nothing installed
    dry = run_cli(s, "replay", "--app", APP, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert summary(dry.stdout) == (
        f"replay: app={APP} states=1 applied={QUERIES} replayed=0 no_signal=0 "
        "installed=false (dry run)"
    )
    replayed, _ = replay(s, APP, dry_run=True)
    assert replayed[APP].to_state() == live  # replay from scratch equals what was learned
    for model, weight in replayed[APP].weights().items():
        (row,) = [x for x in dry.stdout.splitlines() if f" {model} " in x]
        assert row.count(f"{weight:.4f}") == 2, row  # live and replayed columns
    assert "feedback records" in dry.stderr and "records/s" in dry.stderr  # the progress bar

    # from an offset of every feedback partition: a different state, installed; twice
    # installs the same
    partial, counts = replay(s, APP, from_offset=5, dry_run=True)
    later = [
        m
        for m in read_to_end(s, topics.FEEDBACK, timeout=30)
        if m.offset() >= 5 and codec.decode("Feedback", m.value())["app"] == APP
    ]
    assert counts["applied"] == len(later) > 0
    assert partial[APP].to_state() != live
    for installed in (1.0, 2.0):
        run = run_cli(s, "replay", "--app", APP, "--from-offset", "5")
        assert run.returncode == 0, run.stderr
        assert summary(run.stdout).endswith(" installed=true")
        wait_for(lambda n=installed: snapshots_installed(port) == n, 60, "the snapshot")
        assert live_states(s, APP)[APP].to_state() == partial[APP].to_state()

    # from a time: the ISO form, and epoch milliseconds after the last feedback
    since = datetime.fromtimestamp(after_feedback - 3600, UTC).isoformat()
    everything = run_cli(s, "replay", "--app", APP, "--from-time", since, "--dry-run")
    assert f" applied={QUERIES} " in summary(everything.stdout), everything.stderr
    later = str(int((after_feedback + 3600) * 1000))
    nothing = run_cli(s, "replay", "--app", APP, "--from-time", later, "--dry-run")
    assert " states=0 applied=0 " in summary(nothing.stdout), nothing.stderr

    # from a file of feedback records, installed
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in feedback[:15]))
    from_file = run_cli(s, "replay", "--app", APP, "--file", str(path))
    assert " applied=15 " in summary(from_file.stdout), from_file.stderr
    wanted, _ = replay(s, APP, file=path, dry_run=True)
    wait_for(lambda: snapshots_installed(port) == 3.0, 60, "the file's snapshot")
    assert live_states(s, APP)[APP].to_state() == wanted[APP].to_state()
