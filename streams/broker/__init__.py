"""The embedded dev broker: a real Apache Kafka (KRaft, one combined broker+controller node)
on 127.0.0.1, run from jars that ``mvn`` resolves from Maven Central and caches.

Used by the tests, the demo and the bench; ``KAFKA_BOOTSTRAP_SERVERS`` points everything at
an existing cluster instead.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG4J = HERE / "log4j2.properties"


class BrokerError(RuntimeError):
    """The broker cannot be resolved, started or reached."""


def cache_root() -> Path:
    return Path(os.environ.get("CLIPSTREAM_CACHE_DIR", Path.home() / ".cache" / "clipstream"))


def kafka_version() -> str:
    text = POM.read_text()
    return text.split("<kafka.version>")[1].split("</kafka.version>")[0]


def bootstrap_from_env() -> str | None:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"`{tool}` not found on PATH: {hint}")
    return path


def resolve_jars(cache_dir: Path | None = None) -> list[Path]:
    """Kafka's runtime classpath, resolved once by mvn and cached.

    Resolution happens in a temporary directory renamed into place, under a file lock, so
    two processes resolving at once neither corrupt nor duplicate the cache."""
    libs = (cache_dir or cache_root() / f"kafka-{kafka_version()}") / "libs"
    marker = libs / ".complete"
    if marker.is_file():
        return sorted(libs.glob("*.jar"))
    mvn = _require("mvn", "install Maven (apt-get install maven) to resolve Kafka's jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return sorted(libs.glob("*.jar"))
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise BrokerError(f"mvn could not resolve Kafka {kafka_version()}:\n{tail}")
        (staging / ".complete").write_text(kafka_version())
        if libs.exists():
            shutil.rmtree(libs)
        staging.rename(libs)
    return sorted(libs.glob("*.jar"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def admin_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker answers a metadata request."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError:
        return False  # checked first: librdkafka would log every refused connection
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        return bool(admin.list_topics(timeout=timeout).brokers)
    except Exception:
        return False


class EmbeddedBroker:
    """One Kafka node on 127.0.0.1. ``start()`` formats a fresh KRaft log dir and waits
    until the broker answers; ``stop()`` ends it and every process it started."""

    def __init__(
        self,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: Path | None = None,
        heap: str = "512m",
        extra_config: dict[str, str] | None = None,
        detached: bool = False,
    ) -> None:
        self.port = port
        self.controller_port = controller_port
        self._own_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="kafka-"))
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self.detached = detached
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _properties(self) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
            "SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,"
            "SASL_SSL:SASL_SSL",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": str(2 * 1024 * 1024),
            "log.cleaner.threads": "1",
            "num.network.threads": "2",
            "num.io.threads": "2",
        }
        props.update(self.extra_config)
        return props

    def _java(self, jars: list[Path], main: str, *args: str) -> list[str]:
        java = _require("java", "install a Java 17+ runtime (apt-get install openjdk-17-jre)")
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            # start-up speed on 2 cores matters more here than peak JIT performance
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J}",
            f"-Dclipstream.broker.log={self.log_path}",
            "-cp",
            os.pathsep.join(str(j) for j in jars),
            main,
            *args,
        ]

    def start(self, timeout: float = 120.0) -> None:
        jars = resolve_jars()
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        for port in (self.port, self.controller_port):
            if port_in_use(port):
                raise BrokerError(f"port {port} on 127.0.0.1 is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self._properties().items()))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            self._java(
                jars,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
                "--standalone",
                "--ignore-formatted",
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting the KRaft log dir failed:\n{fmt.stdout}{fmt.stderr}")
        self._out = open(self.data_dir / "broker.out", "ab")  # noqa: SIM115 -- kept while running
        self.proc = subprocess.Popen(
            self._java(jars, "kafka.Kafka", str(config)),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not self.detached:
            atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while not admin_answers(self.bootstrap, timeout=1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"did not answer within {timeout:.0f}s"
                )
                tail = self.log_tail()
                self.stop()
                raise BrokerError(f"Kafka broker {why}; last lines of its log:\n{tail}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self.log_path, self.data_dir / "broker.out"):
            if path.is_file():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._own_data_dir and not self.detached:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a broker that outlives the command that started it (``clipstream broker start``) ------


def state_dir() -> Path:
    return Path(os.environ.get("CLIPSTREAM_STATE_DIR", cache_root() / "broker"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_detached(directory: Path | None = None) -> dict[str, Any] | None:
    """The running background broker's record, or None."""
    path = (directory or state_dir()) / "broker.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if _pid_alive(state["pid"]) and admin_answers(state["bootstrap"]):
        return state
    return None


def start_detached(directory: Path | None = None, port: int | None = None) -> dict[str, Any]:
    directory = directory or state_dir()
    running = status_detached(directory)
    if running is not None:
        return running
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    shutil.rmtree(data, ignore_errors=True)
    broker = EmbeddedBroker(port=port, data_dir=data, detached=True)
    broker.start()
    state = {
        "pid": broker.pid,
        "bootstrap": broker.bootstrap,
        "data_dir": str(data),
        "log": str(broker.log_path),
    }
    (directory / "broker.json").write_text(json.dumps(state))
    return state


def stop_detached(directory: Path | None = None, timeout: float = 30.0) -> bool:
    path = (directory or state_dir()) / "broker.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    path.unlink()
    pid = state["pid"]
    if not _pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True
