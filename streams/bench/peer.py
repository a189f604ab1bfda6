"""The peer: MLServer's Kafka server, with its adaptive batching, on the same model.

MLServer (Seldon) reads V2 inference requests as JSON from a Kafka topic, runs them
through its adaptive batcher (``max_batch_size``/``max_batch_time`` in the model
settings) and answers on an output topic, keyed by the request id. It is installed on
demand into its own virtual environment under ``~/.cache/clipstream/peers/`` (never a
dependency of clipstream) with pinned versions; the model is the bench's own estimator,
written with joblib because that is what MLServer's scikit-learn runtime loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message

from clipstream.streams.bench.loadgen import Protocol, Reply
from clipstream.streams.runtime.ports import free_port

PEER_NAME = "mlserver"
PINS = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "scikit-learn==1.9.1", "numpy==2.4.6"]
PEERS_DIR = Path(os.environ.get("CLIPSTREAM_PEERS_DIR", Path.home() / ".cache/clipstream/peers"))
INSTALL_TIMEOUT_S = 900


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message says why."""


def venv_dir() -> Path:
    return PEERS_DIR / PEER_NAME


def mlserver_bin() -> Path:
    return venv_dir() / "bin" / "mlserver"


def installed() -> bool:
    return (venv_dir() / ".installed").is_file() and mlserver_bin().is_file()


def ensure_installed(log: Path) -> Path:
    """Create the peer's virtualenv on first use (minutes); raise PeerUnavailable if not."""
    if installed():
        return mlserver_bin()
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out
            )
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PINS],
                check=True,
                stdout=out,
                stderr=out,
                timeout=INSTALL_TIMEOUT_S,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise PeerUnavailable(f"installing {' '.join(PINS)} failed ({exc}); see {log}") from exc
    (venv / ".installed").write_text(" ".join(PINS))
    return mlserver_bin()


def write_config(
    root: Path,
    estimator: Any,
    model_name: str,
    bootstrap: str,
    prefix: str,
    max_batch_size: int = 256,
    max_batch_time_s: float = 0.002,
) -> Path:
    """MLServer's settings.json and model-settings.json, and the model as joblib."""
    import joblib

    model_dir = root / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, model_dir / "model.joblib")
    (root / "settings.json").write_text(
        json.dumps(
            {
                "kafka_enabled": True,
                "kafka_servers": bootstrap,
                "kafka_topic_input": f"{prefix}.queries",
                "kafka_topic_output": f"{prefix}.predictions",
                "http_port": free_port(),
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                # in the server process: MLServer 1.7.1's separate inference pool dies at
                # start with uvloop 0.23 ("There is no current event loop")
                "parallel_workers": 0,
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": model_name,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib"},
                # its adaptive batching, set like clipstream's (256 rows, 2 ms window)
                "max_batch_size": max_batch_size,
                "max_batch_time": max_batch_time_s,
            }
        )
    )
    return root


def protocol(prefix: str, model_name: str) -> Protocol:
    headers = [("mlserver-model", model_name.encode())]

    def encode(qid: str, row: np.ndarray, _deadline_ms: int) -> tuple[bytes, bytes, list]:
        request = {
            "id": qid,
            "inputs": [
                {
                    "name": "input-0",
                    "shape": [1, len(row)],
                    "datatype": "FP64",
                    "data": row.tolist(),
                }
            ],
        }
        return qid.encode(), json.dumps(request).encode(), headers

    def decode(msg: Message) -> Reply | None:
        key = msg.key()
        if not key:
            return None
        # an MLServer answer is an inference response; its key is the request id
        body = json.loads(msg.value())
        return Reply(key.decode(), error=None if body.get("outputs") else "no outputs")

    return Protocol(f"{prefix}.queries", f"{prefix}.predictions", encode, decode)
