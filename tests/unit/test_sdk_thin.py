"""The SDK is a thin client: `pip install clipstream` brings confluent-kafka and fastavro
only, and `clipstream.streams.sdk` works with nothing else (issue 13). Checked in a
child interpreter where every other installed distribution fails to import, which is what
a fresh venv with only those two would do, without building one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OWN = {"clipstream"}


def base_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[=<>~!\[; ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]]


def blocked_modules() -> list[str]:
    """Top-level modules of every installed distribution the base install would not have."""
    allowed = set(base_requirements())
    for name in list(allowed):  # and what those need in turn
        for req in metadata.requires(name) or []:
            if "extra ==" not in req:
                allowed.add(re.split(r"[=<>~!\[; ]", req, maxsplit=1)[0].lower())
    normalise = lambda d: d.lower().replace("_", "-")  # noqa: E731
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if module not in OWN and not any(normalise(d) in allowed for d in dists)
    )


CHILD = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (base install)", name=name)
        return None

sys.meta_path.insert(0, Block())
"""


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD + code, json.dumps(blocked_modules())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_base_install_is_confluent_kafka_and_fastavro() -> None:
    assert base_requirements() == ["confluent-kafka", "fastavro"]
    blocked = blocked_modules()
    for server_side in ("aiohttp", "numpy", "sklearn", "click", "rich"):
        assert server_side in blocked


def test_the_sdk_works_with_the_base_install_alone() -> None:
    done = run_child(
        """
from clipstream.streams.wire.config import Settings
from clipstream.streams.sdk import Client, PredictionReader, Predictor
from clipstream.streams.sdk_async import AsyncClient, AsyncPredictor
from clipstream.streams.wire import codec
Client(Settings(bootstrap="127.0.0.1:1"))  # builds its producer; connects lazily
AsyncClient(Settings(bootstrap="127.0.0.1:1"))
query = {"query_id": "q", "app": "digits", "user": None, "features": [1.0, 2.0], "raw": None,
         "text": None, "sent_at_us": 1, "deadline_ms": None}
assert codec.decode("Query", codec.encode("Query", query)) == query
for server_side in ("faust", "numpy", "sklearn", "click"):
    assert server_side not in sys.modules, server_side
print("sdk ok")
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sdk ok"


def test_the_cli_without_the_server_extra_says_what_to_install() -> None:
    done = run_child("from clipstream.streams.ops.cli import main\n")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: the clipstream command needs the server extra (click is not installed): "
        "pip install 'clipstream[server]'"
    )
