"""Child processes (workers, replicas) started by the demo, the bench and the tests.

Each child runs in its own session so that stopping it also stops anything it started,
and every child still alive when the parent exits is killed: a leftover worker must not
serve the next run's broker.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import IO

_children: weakref.WeakSet[Child] = weakref.WeakSet()


class Child:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 -- lives as long as the child
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _children.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def clipstream_command(*args: str) -> list[str]:
    """The CLI run with this interpreter, so a child uses the same environment."""
    return [sys.executable, "-m", "clipstream.streams.ops.cli", *args]


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return Child(name, args, full_env, log_dir / f"{name}.log")


@atexit.register
def _kill_children() -> None:
    for child in list(_children):
        child.signal(signal.SIGKILL)
