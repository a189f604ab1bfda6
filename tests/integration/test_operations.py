"""docs/operations.md Part 1 runs as written: its ```bash tested blocks, joined into one
script, against the test broker (only ports and the model directory swapped for free
ones). Then what the walk-through promises is checked: a REST and a Kafka prediction from
the models, feedback that moves the Exp4 weights `clipstream status` shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clipstream.streams.runtime.ports import free_port
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"


def walkthrough() -> str:
    blocks = re.findall(r"```bash tested\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 4, "the tested blocks of docs/operations.md went missing"
    return "".join(blocks)


@pytest.mark.timeout(600)  # a dozen CLI processes on a shared 2-core machine
@pytest.mark.skipif(not shutil.which("curl"), reason="the walk-through uses curl")
def test_the_operations_walkthrough_runs_as_written(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    script = walkthrough()
    for port in ("6066", "9400", "9401", "9402"):
        assert port in script
        script = script.replace(port, str(free_port()))
    script = script.replace("/tmp/clipstream-models", str(tmp_path / "models"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(kafka_settings.partitions),
        "COLUMNS": "250",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CLIPSTREAM_METRICS_URLS", None)
    log = tmp_path / "walkthrough.log"
    with log.open("wb") as sink:  # a file: the background processes keep a pipe open forever
        run = subprocess.Popen(
            ["bash", "-c", "set -euo pipefail\n" + script],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the background processes it starts share its group
        )
    try:
        run.wait(timeout=480)
        out = log.read_text(errors="replace")
        assert run.returncode == 0, out
        predictions = [json.loads(line) for line in out.splitlines() if line.startswith('{"')]
        by_user = {p.get("user"): p for p in predictions if "query_id" in p and "label" in p}
        rest, kafka = by_user["alice"], by_user[None]
        for prediction in (rest, kafka):
            # digit 0, answered by both models (the default would be -1 with no models)
            assert prediction["label"] == "0" and not prediction["default"], prediction
            assert sorted(prediction["models"]) == ["digits-forest@1", "digits-logreg@1"]
        assert rest["query_id"] != kafka["query_id"]
        assert out.count("sent") >= 2  # clipstream feedback, twice
        assert {"query_id": "no-such-query", "accepted": True} in predictions
        for word in ("digits-logreg", "digits-forest", "EXP4", "v1"):
            assert word in out, word

        urls = re.search(r"CLIPSTREAM_METRICS_URLS=(\S+)", script).group(1)  # type: ignore[union-attr]

        def learned() -> dict | None:
            status = subprocess.run(
                ["clipstream", "status", "--json"],
                env={**env, "CLIPSTREAM_METRICS_URLS": urls},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert status.returncode == 0, status.stderr
            (app,) = json.loads(status.stdout)["apps"]
            # a worker exports an app's weights once feedback has updated them
            weights = app["weights"].get("digits", {})
            return app if set(weights) == {"digits-logreg", "digits-forest"} else None

        app = wait_for(learned, 120, "status to show the weights the feedback updated", 1.0)
        assert sum(app["weights"]["digits"].values()) == pytest.approx(1.0)
        assert app["predictions"] >= 3 and app["p50_ms"] is not None
    finally:
        if run.poll() is None:
            run.kill()
        # the worker and replicas the script left in the background
        try:
            os.killpg(run.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        else:
            wait_for(lambda: not _group_alive(run.pid), 30, "the walk-through's processes")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
