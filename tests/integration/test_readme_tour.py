"""The README's five-minute tour runs as written (issue 13: it named `clipstream replay`,
which did not exist): its block, as one bash script, from `clipstream broker start` to
`clipstream broker stop`. Only the set-up line (this interpreter's environment is already
installed), the ports and the model directory are swapped, and the broker's state
directory is the test's own."""

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
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SETUP = "make install && . .venv/bin/activate"


def tour() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## A five-minute tour\n\n```sh\n(.*?)```", readme, re.S)
    assert block is not None, "the README's tour went missing"
    return block.group(1)


def predictions(out: str) -> list[dict]:
    """Every prediction printed, by `clipstream query` or by curl."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(out, m.start())[0] for m in re.finditer(r'\{"query_id"', out)]


@pytest.mark.timeout(600)
@pytest.mark.skipif(not shutil.which("curl"), reason="the tour uses curl")
def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    script = tour()
    assert script.startswith(SETUP + "\n")
    script = script.removeprefix(SETUP + "\n")
    for port in ("6066", "9400", "9401"):
        assert port in script
        script = script.replace(port, str(free_port()))
    script = script.replace("/tmp/m", str(tmp_path / "m"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CLIPSTREAM_STATE_DIR": str(tmp_path / "state"),  # its own `clipstream broker start`
        "COLUMNS": "250",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "CLIPSTREAM_METRICS_URLS"):
        env.pop(name, None)
    log = tmp_path / "tour.log"
    with log.open("wb") as sink:  # a file: the background processes keep a pipe open
        run = subprocess.Popen(
            ["bash", "-c", "set -euo pipefail\n" + script],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        run.wait(timeout=540)
        out = log.read_text(errors="replace")
        assert run.returncode == 0, out
        assert re.search(r"^KAFKA_BOOTSTRAP_SERVERS=127\.0\.0\.1:\d+$", out, re.M), out
        by_id = {p["query_id"]: p for p in predictions(out)}
        assert by_id["q1"]["label"] == "0", out  # over Kafka (the model, or the default 0)
        rest = [p for q, p in by_id.items() if q != "q1"]
        assert rest and rest[0]["label"] == "0", out  # over REST
        assert re.search(r"^sent$", out, re.M), out  # clipstream feedback
        assert "digits-logreg v2 serving" in out and "digits-logreg v1 serving" in out
        replays = re.findall(r"^replay: app=digits .*$", out, re.M)
        assert len(replays) == 2, out
        assert replays[0].endswith("installed=false (dry run)")
        assert replays[1].endswith("installed=true")
        assert out.rstrip().endswith("stopped"), out  # clipstream broker stop
        assert "Traceback" not in out and "error:" not in out, out
    finally:
        if run.poll() is None:
            run.kill()
        try:
            os.killpg(run.pid, signal.SIGTERM)  # what the tour left in the background
        except ProcessLookupError:
            pass
        else:
            wait_for(lambda: not _group_alive(run.pid), 30, "the tour's processes")
        stop = [sys.executable, "-m", "clipstream.streams.ops.cli", "broker", "stop"]
        subprocess.run(stop, env=env, timeout=60)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
