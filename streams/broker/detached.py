"""A broker that outlives the command that started it (``clipstream broker start``): its
state file, ``broker.json`` under ``$CLIPSTREAM_STATE_DIR``, and the start, stop and status
the CLI runs on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from clipstream.streams.broker.jars import cache_root, file_lock
from clipstream.streams.broker.process import EmbeddedBroker, admin_answers, pid_alive


def default_state_dir() -> Path:
    """``$CLIPSTREAM_STATE_DIR``, else ``~/.cache/clipstream/broker``."""
    return Path(os.environ.get("CLIPSTREAM_STATE_DIR") or cache_root() / "broker")


def _is_our_broker(pid: int, data_dir: str) -> bool:
    """pid is alive and still the Kafka started for data_dir (not a recycled pid)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return sys.platform != "linux"  # no /proc to ask: trust the pid
    return "kafka.Kafka" in cmdline and data_dir in cmdline


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((state_dir / "broker.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not {"pid", "bootstrap", "data_dir", "log"} <= state.keys():
        return None
    return state


def status_detached(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The background broker's record ``{pid, bootstrap, data_dir, log}`` if it is running
    and answering, else None."""
    state = _read_state(Path(state_dir) if state_dir is not None else default_state_dir())
    if state is None or not _is_our_broker(int(state["pid"]), str(state["data_dir"])):
        return None
    return state if admin_answers(str(state["bootstrap"])) else None


def start_detached(
    state_dir: Path | None = None, port: int | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Start a broker in the background (its own session, no atexit kill) and record it in
    ``state_dir/broker.json``; return the running one's record instead if there is one."""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    with file_lock(directory / ".lock"):  # two `broker start` at once start one broker
        running = status_detached(directory)
        if running is not None:
            return running
        _stop_recorded(directory, timeout=30.0)  # a hung or half-dead one from before
        data = directory / "data"
        shutil.rmtree(data, ignore_errors=True)  # a fresh cluster every start
        broker = EmbeddedBroker(port=port, data_dir=data, detached=True)
        broker.start(timeout)
        state = {
            "pid": broker.pid,
            "bootstrap": broker.bootstrap,
            "data_dir": str(data),
            "log": str(broker.log_path),
        }
        record = directory / "broker.json"
        tmp = record.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, record)
        return state


def stop_detached(state_dir: Path | None = None, timeout: float = 30.0) -> bool:
    """Stop the background broker; False when none was running."""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    with file_lock(directory / ".lock"):
        return _stop_recorded(directory, timeout)


def _stop_recorded(directory: Path, timeout: float) -> bool:
    state = _read_state(directory)
    (directory / "broker.json").unlink(missing_ok=True)
    if state is None:
        return False
    pid = int(state["pid"])
    if not _is_our_broker(pid, str(state["data_dir"])):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return True
