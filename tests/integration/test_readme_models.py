"""The README's model-files block (skops and ONNX side by side) runs as written against
the test broker: only the model directory is swapped for the test's own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def block() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"### Model files: skops and ONNX\n.*?```sh\n(.*?)```", readme, re.S)
    assert found is not None, "the README's model-files block went missing"
    return found.group(1)


@pytest.mark.timeout(300)
def test_the_readme_model_files_block_runs_as_written(kafka_settings, digits_models, tmp_path):
    models = tmp_path / "m"
    models.mkdir()
    for name in ("digits-forest",):
        (models / f"{name}.skops").write_bytes(Path(digits_models[name][0]).read_bytes())
    script = block().replace("/tmp/m", str(models))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap(),
        "COLUMNS": "250",
    }
    run = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert (models / "digits-forest.onnx").is_file()
    rows = {
        cells[0]: cells
        for line in run.stdout.splitlines()
        if line.startswith("│")
        and len(cells := [c.strip() for c in line.strip("│").split("│")]) > 5
    }
    assert rows["digits-forest"][4] == "skops", out  # the table `model list` prints
    assert rows["digits-forest-onnx"][4] == "onnx", out
