"""Kafka's jars: the pom's runtime classpath, resolved once by ``mvn`` from Maven Central
into a cache under ``~/.cache/clipstream``; also the error every part of the dev broker
raises and the lookups of ``java`` and ``mvn`` it needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
MARKER = ".complete"


class BrokerError(RuntimeError):
    """The broker cannot be resolved, started or reached."""


def cache_root() -> Path:
    """``$CLIPSTREAM_CACHE_DIR``, else ``~/.cache/clipstream``."""
    return Path(os.environ.get("CLIPSTREAM_CACHE_DIR") or Path.home() / ".cache" / "clipstream")


@functools.cache
def kafka_version() -> str:
    """The Kafka version the pom pins."""
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", POM.read_text())
    if match is None:
        raise BrokerError(f"{POM} does not define <kafka.version>")
    return match.group(1)


def default_libs_dir() -> Path:
    """``<cache_root>/kafka-<version>/libs``, where ``resolve_jars`` keeps the jars."""
    return cache_root() / f"kafka-{kafka_version()}" / "libs"


def require_tool(tool: str, hint: str) -> str:
    """The path of ``tool`` on PATH; a BrokerError saying what to install otherwise."""
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"`{tool}` not found on PATH: {hint}")
    return path


def java() -> str:
    """The ``java`` that runs the broker (and mvn)."""
    return require_tool("java", "install a Java 17+ runtime (e.g. apt-get install openjdk-17-jre)")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created with its parents) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pom_digest() -> str:
    # in the marker, so editing the pom (say, the log4j version) invalidates the cache even
    # though the directory name only carries the Kafka version
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def _cached_jars(libs: Path) -> list[Path] | None:
    try:
        marker = json.loads((libs / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("pom") != _pom_digest():
        return None
    jars = [libs / name for name in marker.get("jars", [])]
    if not jars or not all(jar.is_file() for jar in jars):
        return None
    return sorted(jars)


def resolve_jars(cache_dir: Path | None = None) -> list[Path]:
    """Kafka's runtime classpath: the pom's runtime dependencies, copied by mvn into
    ``cache_dir`` (default ``~/.cache/clipstream/kafka-<version>/libs``) once and reused.

    mvn resolves into a staging directory that is renamed into place under a file lock, so
    concurrent callers neither corrupt the cache nor run mvn twice."""
    libs = Path(cache_dir) if cache_dir is not None else default_libs_dir()
    jars = _cached_jars(libs)
    if jars:
        return jars
    java()  # mvn needs it too, and its own error for a missing JDK is cryptic
    mvn = require_tool("mvn", "install Maven 3 (e.g. apt-get install maven) to fetch Kafka's jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(libs.parent / f".{libs.name}.lock"):
        jars = _cached_jars(libs)
        if jars:
            return jars  # another process finished while this one waited
        staging = Path(tempfile.mkdtemp(prefix=f".{libs.name}-", dir=libs.parent))
        try:
            _run_mvn(mvn, staging)
            names = sorted(p.name for p in staging.glob("*.jar"))
            marker = {"kafka": kafka_version(), "pom": _pom_digest(), "jars": names}
            (staging / MARKER).write_text(json.dumps(marker, indent=1))
            staging.chmod(0o755)  # mkdtemp makes it 0700
            if libs.exists():
                shutil.rmtree(libs)  # stale (older pom) or a partial copy from a crash
            staging.rename(libs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    jars = _cached_jars(libs)
    if not jars:
        raise BrokerError(f"resolved Kafka's jars into {libs} but cannot read them back")
    return jars


def _run_mvn(mvn: str, out_dir: Path) -> None:
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",  # compile scope lacks kafka-server, kafka-raft, ...
        f"-DoutputDirectory={out_dir}",
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(
            f"mvn did not finish resolving Kafka's jars in {exc.timeout:.0f}s"
        ) from exc
    if result.returncode != 0 or not any(out_dir.glob("kafka_2.13-*.jar")):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise BrokerError(
            f"mvn could not resolve Kafka {kafka_version()} (exit {result.returncode}); "
            f"command: {shlex.join(cmd)}\n{tail}"
        )
