"""The README's selection-bench command runs as written (no broker: the selection code the
worker runs, over models trained here) and prints the accuracies it quotes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_selection_bench_command_runs_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"`(clipstream bench --suite selection[^`]*)`", readme)
    assert found is not None, "the README's selection command went missing"
    args = shlex.split(found.group(1))[1:]
    done = subprocess.run(
        [sys.executable, "-m", "clipstream.streams.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("bench: suite=selection exp4_accuracy=")
    for model in found.group(1).split("--models ")[1].split(","):
        assert f" {model}=" in summary, (model, summary)
