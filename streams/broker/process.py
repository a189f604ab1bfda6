"""The embedded broker's process: one Kafka node (broker and KRaft controller) on 127.0.0.1,
from its server.properties and JVM command line to start-up, readiness and stop.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from clipstream.streams.broker.jars import HERE, BrokerError, java, resolve_jars
from clipstream.streams.runtime.ports import HOST, free_port, port_in_use

LOG4J = HERE / "log4j2.properties"

# Start-up speed on a 2-core dev box matters more than peak JIT throughput. Measured here
# (format + ready): defaults ~5.5-7.5 s, C1 only + serial GC ~4.5 s, plus the AppCDS archive
# (see _cds_flags) ~2-3 s; client-bound produce/consume rates did not differ between C1 and C2.
# CLIPSTREAM_BROKER_JVM_OPTS is appended, so e.g. "-XX:TieredStopAtLevel=4" undoes C1-only.
# Under sustained load C2 does matter: the bench starts its broker with PEAK_JIT.
# The parallel collector, not the serial one: under load (250 q/s through the bench's
# ensemble) the serial collector stopped the broker for 10-30 ms every two seconds, and
# those pauses held a third to a half of the slowest 1% of queries; the parallel one's
# pauses were 3-7 ms and held 0-6 % of them. It starts as fast (docs/benchmarks.md, "The broker's
# collector").
JVM_OPTIONS = (
    "-XX:+UseParallelGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


#: full JIT: a slower start, but the broker's cost per request under sustained load is
#: lower (measured at 3,000 q/s through clipstream: p50 28.5 -> 18.0 ms, p99 74 -> 50 ms)
PEAK_JIT = ("-XX:TieredStopAtLevel=4",)


# -- readiness -------------------------------------------------------------------------------


def admin_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError):
        return False  # checked first: librdkafka would log every refused connection
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        return bool(admin.list_topics(timeout=timeout).brokers)
    except Exception:
        return False


# -- the broker ------------------------------------------------------------------------------


def _props_escape(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise BrokerError(f"a broker property value cannot span lines: {value!r}")
    return value.replace("\\", "\\\\")


def _cds_archive(libs: Path) -> Path:
    binary = Path(os.path.realpath(java()))
    jvm = hashlib.sha256(f"{binary}:{binary.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    return libs / f".kafka-cds-{jvm}.jsa"


def new_cluster_id() -> str:
    # Kafka's own Uuid.randomUuid(): 22 url-safe base64 chars, never a leading "-", which the
    # format command line would take for an option
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel kill the child when its parent dies (Linux).

    atexit does not run when the Python process is killed by a signal; this does. The
    signal fires when the forking *thread* exits, so only use it from the main thread."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedBroker:
    """One Kafka node (broker and KRaft controller) on 127.0.0.1.

    ``start()`` formats the log dir and returns once the broker answers; ``stop()`` ends it.
    Unless ``detached``, it never outlives the Python process that started it."""

    def __init__(
        self,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: Path | None = None,
        heap: str = "512m",
        extra_config: dict[str, str] | None = None,
        detached: bool = False,
        jvm_options: tuple[str, ...] = (),
        cluster_id: str | None = None,
    ) -> None:
        self.port = port
        self.controller_port = controller_port
        #: appended to JVM_OPTIONS (before CLIPSTREAM_BROKER_JVM_OPTS)
        self.jvm_options = tuple(jvm_options)
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._own_data_dir = data_dir is None
        self.heap = heap
        self.extra_config = dict(extra_config or {})
        self.detached = detached
        #: the nodes of one cluster share it (streams/broker/cluster.py)
        self.cluster_id = cluster_id or new_cluster_id()
        self.jars: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._cds_dump: Path | None = None

    # -- properties ---------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT`` of the PLAINTEXT listener (known once ``start()`` chose it)."""
        if self.port is None:
            raise BrokerError("the broker has no port yet: call start() first")
        return f"{HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise BrokerError("the broker has no data dir yet: call start() first")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """Where the broker's log4j output and its stdout/stderr go."""
        return self.data_dir / "broker.log"

    @property
    def gc_log_path(self) -> Path:
        """The broker JVM's collections, one line each (the bench reads its pauses)."""
        return self.data_dir / "gc.log"

    @property
    def pid(self) -> int | None:
        """The running broker's process id (also its process group's), else None."""
        return self.proc.pid if self.running() else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def properties(self) -> dict[str, str]:
        """server.properties; ``extra_config`` wins, so e.g. a SASL_SSL listener can be added
        by overriding ``listeners`` and ``advertised.listeners`` (the map already names it)."""
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
            "SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "auto.create.topics.enable": "false",  # every topic is created deliberately
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",  # 50 by default: slow first group join
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # the serving group detects a crashed worker in 2 s (worker.serving); Kafka's
            # default minimum session timeout is 6 s
            "group.min.session.timeout.ms": "1000",
            # Kafka requires strictly more than 1 MiB per cleaner thread; 128 MiB by default
            "log.cleaner.dedupe.buffer.size": str(2 * 1024 * 1024),
            "log.cleaner.threads": "1",
            "num.network.threads": "2",
            "num.io.threads": "2",
        }
        props.update(self.extra_config)
        if "controller.quorum.voters" in props:  # a static quorum excludes the dynamic one
            props.pop("controller.quorum.bootstrap.servers", None)
        return props

    def _write_properties(self) -> Path:
        config = self.data_dir / "server.properties"
        lines = [f"{key}={_props_escape(str(value))}\n" for key, value in self.properties().items()]
        header = "# written by clipstream.streams.broker.EmbeddedBroker\n"
        config.write_text(header + "".join(lines))
        return config

    # -- JVM ------------------------------------------------------------------------------

    def _cds_flags(self, dump: bool) -> list[str]:
        # An AppCDS archive of the classes a broker loads cuts start-up by ~1 s on 2 cores.
        # The first in-process broker writes it when it exits (to a temp name, renamed in
        # stop() only after a clean exit). It lives in the libs dir, so a re-resolve drops
        # it, and its name carries the JVM build, which an archive is only valid for.
        if os.environ.get("CLIPSTREAM_BROKER_CDS", "1") == "0" or not self.jars:
            return []
        archive = _cds_archive(self.jars[0].parent)
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}"]
        if dump and not self.detached:
            for stale in archive.parent.glob(f"{archive.name}.*.tmp"):
                with contextlib.suppress(ValueError, OSError):
                    if not pid_alive(int(stale.name.split(".")[-3])):
                        stale.unlink()  # its JVM was killed while dumping
            self._cds_dump = archive.with_name(f"{archive.name}.{os.getpid()}.{id(self)}.tmp")
            return [f"-XX:ArchiveClassesAtExit={self._cds_dump}"]
        return []

    def _command(
        self, main: str, *args: str, dump_cds: bool = False, gc_log: bool = False
    ) -> list[str]:
        return [
            java(),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            *JVM_OPTIONS,
            *self._cds_flags(dump_cds),
            # wall-clock stamps, so a pause can be matched to the queries it held up
            *([f'-Xlog:gc:file="{self.gc_log_path}":timemillis,uptime'] if gc_log else []),
            *self.jvm_options,
            *shlex.split(os.environ.get("CLIPSTREAM_BROKER_JVM_OPTS", "")),
            f"-Dlog4j2.configurationFile={LOG4J}",
            f"-Dclipstream.broker.log={self.log_path}",
            "-cp",
            os.pathsep.join(str(j) for j in self.jars),
            main,
            *args,
        ]

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Format the log dir, launch the broker and wait until it answers metadata requests.

        Raises BrokerError (with the log's tail) when a port is taken, the JVM exits, or the
        broker does not answer within ``timeout`` seconds (jar resolution not included)."""
        if self.running():
            raise BrokerError(f"this broker is already running at {self.bootstrap}")
        for port in (self.port, self.controller_port):
            if port is not None and port_in_use(port):
                raise BrokerError(
                    f"cannot start Kafka: port {port} on {HOST} is already in use "
                    "(another broker, or some other process, is listening there)"
                )
        self.jars = resolve_jars()
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="clipstream-kafka-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pick_port, pick_controller = self.port is None, self.controller_port is None
        fresh = not (self.data_dir / "logs").exists()
        for attempt in range(3):
            if pick_port:
                self.port = free_port()
            if pick_controller:
                self.controller_port = free_port(exclude=(self.port or 0,))
            try:
                self._launch(timeout)
                return
            except BrokerError as exc:
                self._abandon()
                # a port picked here can be taken by someone else before Kafka binds it; then
                # pick again, unless the ports were given or the log dir held data before
                busy = "Address already in use" in str(exc)
                if not (busy and fresh and (pick_port or pick_controller)) or attempt == 2:
                    self.stop()
                    raise
                shutil.rmtree(self.data_dir / "logs", ignore_errors=True)

    def _launch(self, timeout: float) -> None:
        config = self._write_properties()
        started = time.monotonic()
        self._format(config, timeout)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- the broker's stdout while it runs
        self.proc = subprocess.Popen(
            self._command("kafka.Kafka", str(config), dump_cds=True, gc_log=True),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() signals the whole group; Ctrl-C in a shell does not
            preexec_fn=None if self.detached else _die_with_parent(),
        )
        if not self.detached:
            atexit.register(self.stop)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} during start-up")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not answer within {timeout:.0f}s")
            if admin_answers(self.bootstrap, timeout=max(0.1, min(1.0, remaining))):
                return
            time.sleep(0.05)  # poll interval, not a synchronisation delay

    def _format(self, config: Path, timeout: float) -> None:
        if (self.data_dir / "logs" / "meta.properties").is_file():
            # a data_dir reused across starts keeps its cluster and data; --ignore-formatted
            # is not enough, since 4.x rejects a formatted dir whose cluster id differs
            return
        args = ["format", "--cluster-id", self.cluster_id, "--config", str(config)]
        if "controller.quorum.voters" not in self.properties():
            args.append("--standalone")  # 4.x dynamic quorum: this node is the only voter
        args.append("--ignore-formatted")  # another process may have formatted it meanwhile
        try:
            fmt = subprocess.run(
                self._command("kafka.tools.StorageTool", *args),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"formatting the KRaft log dir took over {timeout:.0f}s") from exc
        if fmt.returncode != 0:
            raise BrokerError(
                f"formatting the KRaft log dir {self.data_dir / 'logs'} failed "
                f"(exit {fmt.returncode}):\n{fmt.stdout}{fmt.stderr}".rstrip()
            )

    def _fail(self, why: str) -> None:
        self._terminate(5.0)
        where = "" if self._own_data_dir else f" (log: {self.log_path})"
        raise BrokerError(f"Kafka broker {why}{where}; last lines of its log:\n{self.log_tail()}")

    def _abandon(self) -> None:
        """Undo a failed launch: the process, its log handle, its half-written CDS archive."""
        self._terminate(5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._cds_dump is not None:
            self._cds_dump.unlink(missing_ok=True)
            self._cds_dump = None
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, BrokerError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # Kafka shuts down cleanly on SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the broker's process group, SIGKILL after ``timeout``; idempotent. Removes
        the data dir if this object created it."""
        self._shut_down(timeout)
        if self._own_data_dir and self._data_dir is not None and not self.detached:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def restart(self, timeout: float = 120.0, *, crash: bool = False) -> None:
        """Stop the broker (SIGKILL if ``crash``, else a clean SIGTERM) and start it again on
        the same ports and log dir, so topics, data and committed offsets survive; clients
        reconnect on their own. For fault tests."""
        if crash:
            self.kill()
        self._shut_down(timeout)
        self._launch(timeout)

    def kill(self) -> None:
        """SIGKILL the broker, as a machine's crash: no clean shutdown, no leadership
        hand-off; the log dir stays, so ``start()`` brings the node back with its data."""
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._shut_down(5.0)

    def _shut_down(self, timeout: float) -> None:
        """Stop the process and release what belongs to it; the data dir stays."""
        self._terminate(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._keep_cds_archive()
        atexit.unregister(self.stop)

    def _keep_cds_archive(self) -> None:
        dump, self._cds_dump = self._cds_dump, None
        if dump is None:
            return
        clean_exit = self.proc is not None and self.proc.returncode in (0, 143, -signal.SIGTERM)
        if clean_exit and dump.is_file() and dump.stat().st_size > 0:
            os.replace(dump, _cds_archive(dump.parent))
        else:
            dump.unlink(missing_ok=True)  # killed mid-dump: may be truncated

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"EmbeddedBroker(port={self.port}, pid={self.pid}, {state})"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        # our own exited child stays a zombie (and "alive" to kill 0) until reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True
