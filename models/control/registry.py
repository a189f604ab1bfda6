"""Model and app registry on the compacted control topic.

Every worker and replica follows ``clipstream.control`` from the beginning, so a deploy,
rollback or app registration reaches all of them without a restart. The latest record per
key wins (the topic is compacted), and reading it to the end rebuilds the whole registry.
Records are checked when written and when read (``models.control.specs``): a bad one is refused
and the last good spec of its model or app stays in force.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from copy import deepcopy
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from clipstream.models.control import artifacts
from clipstream.models.control.specs import refusal
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import watermarks
from clipstream.streams.wire.sensors import Sensor

log = logging.getLogger("clipstream.registry")


class RegistryError(ValueError):
    """A deploy, rollback or registration that cannot be done as asked."""


class Registry:
    """In-memory view of the control topic: models and apps by name."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        self.apps: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def apply(self, record: dict[str, Any]) -> str | None:
        """Apply one control record, or refuse it and return why (the last good spec of
        its model or app stays)."""
        reason = refusal(record)
        if reason is not None:
            return reason
        with self._lock:
            table = self.models if record["kind"] == "MODEL" else self.apps
            if record.get("deleted"):
                table.pop(record["name"], None)
            else:
                table[record["name"]] = (
                    record["model"] if record["kind"] == "MODEL" else record["app"]
                )
        return None

    def model(self, name: str) -> dict[str, Any] | None:
        return self.models.get(name)

    def app(self, name: str) -> dict[str, Any] | None:
        return self.apps.get(name)

    def version_spec(self, name: str, version: int | None = None) -> dict[str, Any] | None:
        """The spec of one version of a model (the serving one when version is None)."""
        spec = self.models.get(name)
        if spec is None:
            return None
        wanted = spec["version"] if version is None else version
        for v in spec["versions"]:
            if v["version"] == wanted:
                return v
        return None


class ControlFollower:
    """Reads the control topic into a Registry: to the end once, then in the background."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
        sensor: Sensor | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or Registry()
        self.on_change = on_change
        self.sensor = sensor or Sensor()
        self._consumer = Consumer(
            settings.kafka(
                **{
                    # assign(), never subscribe(): every follower reads every record
                    "group.id": f"clipstream-control-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                }
            )
        )
        self._assigned = False
        self._next_offset = 0
        #: control records refused as invalid (each logged once, as it is read)
        self.refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # notified after each read, for wait_until()
        self._advanced = threading.Condition()

    def topic_exists(self, timeout: float = 10.0) -> bool:
        md = self._consumer.list_topics(topics.CONTROL, timeout=timeout).topics
        found = md.get(topics.CONTROL)
        return found is not None and found.error is None and bool(found.partitions)

    def wait_for_topic(self, stopping: threading.Event) -> bool:
        """Wait until the control topic exists (a worker or the first ``clipstream model
        deploy`` creates it), saying once that it does not yet; False if ``stopping`` is set
        first. A process started before anything else waits instead of failing."""
        said = False
        while not stopping.is_set():
            if self.topic_exists():
                return True
            if not said:
                log.warning(
                    "the control topic %s does not exist yet: waiting for a worker "
                    "(`clipstream worker`) or a deploy (`clipstream model deploy`) to create it",
                    topics.CONTROL,
                )
                said = True
            stopping.wait(0.5)
        return False

    def wait_for(
        self, predicate: Callable[[], bool], stopping: threading.Event, waiting: str
    ) -> bool:
        """After ``start()``: wait until ``predicate`` holds, logging ``waiting`` once if it
        does not yet; False if ``stopping`` is set first."""
        if predicate():
            return True
        log.warning(waiting)
        while not stopping.is_set():
            if self.wait_until(predicate, 0.5):
                return True
        return False

    def sync(self, timeout: float = 30.0) -> Registry:
        """Read up to the current end of the control topic."""
        if not self._assigned:
            if not self.topic_exists(timeout):
                raise RegistryError(
                    f"the control topic {topics.CONTROL} does not exist yet: start a worker "
                    "(`clipstream worker`) or deploy a model (`clipstream model deploy`) first"
                )
            # assigned only once it exists: an assignment of a missing partition fails
            self._consumer.assign([TopicPartition(topics.CONTROL, 0, OFFSET_BEGINNING)])
            self._assigned = True
        low, high = watermarks(self._consumer, TopicPartition(topics.CONTROL, 0), timeout)
        deadline = time.monotonic() + timeout
        while True:
            if max(self._next_offset, low) >= high:
                return self.registry
            if time.monotonic() > deadline:
                raise TimeoutError("control topic not read to its end in time")
            self._poll(0.2)

    def _poll(self, timeout: float) -> None:
        # One lock over reading and applying: ``sync`` in another thread must not see the
        # offset advanced before the record it covers is in the registry.
        with self._lock:
            for msg in self._consumer.consume(100, timeout):
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"control topic: {msg.error()}")
                    continue
                try:
                    record = codec.decode("ControlRecord", msg.value())
                    reason = self.registry.apply(record)
                except codec.DecodeError as exc:
                    record, reason = None, str(exc)
                if reason is not None:
                    self._refuse(msg.offset(), record, reason)
                elif record is not None and self.on_change is not None:
                    self.on_change(record)
                self._next_offset = msg.offset() + 1
        with self._advanced:
            self._advanced.notify_all()

    def _refuse(self, offset: int, record: dict[str, Any] | None, reason: str) -> None:
        self.refused += 1
        kind = record["kind"].lower() if record is not None else "undecodable"
        self.sensor.on_control_refused(kind)
        log.error(
            "control record at offset %d refused, the last good spec stays: %s", offset, reason
        )

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait up to ``timeout`` for the follower thread to read records that make
        ``predicate`` true. For callers on other threads once ``start()`` ran: ``sync()``
        there would share the consumer with the follower thread, and its watermark query
        was seen to block for good while the thread consumed."""
        if self._thread is None or not self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                self.sync(timeout)
            return predicate()
        deadline = time.monotonic() + timeout
        with self._advanced:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._advanced.wait(min(remaining, 0.2))
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="control-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll(0.2)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()


def publish(settings: Settings, record: dict[str, Any]) -> None:
    record = {"deleted": False, "at_us": time.time_ns() // 1000, **record}
    reason = refusal(record)
    if reason is not None:
        raise RegistryError(reason)
    producer = Producer(settings.kafka(**{"enable.idempotence": True}))
    key = f"{record['kind'].lower()}:{record['name']}".encode()
    producer.produce(topics.CONTROL, codec.encode("ControlRecord", record), key)
    if producer.flush(30) != 0:
        raise RuntimeError("control record not delivered within 30 s")


def current(settings: Settings) -> Registry:
    # the first command against a new cluster may come before any worker created topics
    ensure_core_topics(settings)
    follower = ControlFollower(settings)
    try:
        return follower.sync()
    finally:
        follower.close()


def deploy_model(
    settings: Settings,
    name: str,
    path: str,
    *,
    method: str = "predict_proba",
    fmt: str = "skops",
    input_dim: int | None = None,
    nan_policy: str = "reject",
    partitions: int | None = None,
    batch_max: int | None = None,
    batch_wait_ms: float | None = None,
    latency_slo_ms: float | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """Add a new version of a model and make it the serving one.

    ``path`` is a local file, whose bytes go to the cluster (models/control/artifacts.py) unless a
    file with the same digest is already there, or a URI replicas download; ``sha256`` is
    the digest the file must have (for a URI, given instead of reading the file once here)."""
    known = current(settings)
    try:
        if artifacts.is_uri(path):
            stored = artifacts.describe_uri(path, sha256)
        else:
            stored = artifacts.upload(
                settings,
                path,
                [v for m in known.models.values() for v in m["versions"]],
                expected=sha256,
            )
    except artifacts.ArtifactError as exc:
        raise RegistryError(str(exc)) from None
    spec = deepcopy(known.model(name)) or {
        "version": 0,
        "versions": [],
        "partitions": partitions or settings.replica_partitions,
        "batch_max": batch_max or settings.batch_max,
        "batch_wait_ms": settings.batch_wait_ms if batch_wait_ms is None else batch_wait_ms,
        "latency_slo_ms": latency_slo_ms or 20.0,
    }
    for key, value in (
        ("partitions", partitions),
        ("batch_max", batch_max),
        ("batch_wait_ms", batch_wait_ms),
        ("latency_slo_ms", latency_slo_ms),
    ):
        if value is not None:
            spec[key] = value
    version = max((v["version"] for v in spec["versions"]), default=0) + 1
    spec["versions"].append(
        {
            "version": version,
            "path": str(path),
            "format": fmt,
            "method": method,
            "input_dim": input_dim,
            "nan_policy": nan_policy,
            "deployed_at_us": time.time_ns() // 1000,
            **stored,
        }
    )
    spec["version"] = version
    ensure_model_topic(settings, name, spec["partitions"])
    publish(settings, {"kind": "MODEL", "name": name, "model": spec, "app": None})
    return spec


def rollback_model(settings: Settings, name: str, version: int | None = None) -> dict[str, Any]:
    """Serve an earlier version again: the one named, else the one before the current."""
    spec = deepcopy(current(settings).model(name))
    if spec is None:
        raise RegistryError(f"no model named {name!r} is deployed")
    known = sorted(v["version"] for v in spec["versions"])
    if version is None:
        older = [v for v in known if v < spec["version"]]
        if not older:
            raise RegistryError(f"{name} v{spec['version']} has no earlier version to roll back to")
        version = older[-1]
    if version not in known:
        raise RegistryError(f"{name} has no version {version}; known: {known}")
    spec["version"] = version
    publish(settings, {"kind": "MODEL", "name": name, "model": spec, "app": None})
    return spec


def register_app(
    settings: Settings,
    name: str,
    models: list[str],
    *,
    policy: str = "SINGLE",
    deadline_ms: float = 100.0,
    default_label: str | None = None,
    personalised: bool = False,
    input_dim: int | None = None,
    eta: float = 0.1,
    gamma: float = 0.05,
    cache: bool = True,
) -> dict[str, Any]:
    spec = {
        "models": list(models),
        "policy": policy.upper(),
        "deadline_ms": float(deadline_ms),
        "default_label": default_label,
        "personalised": personalised,
        "input_dim": input_dim,
        "eta": eta,
        "gamma": gamma,
        "cache": cache,
    }
    record = {"kind": "APP", "name": name, "model": None, "app": spec}
    reason = refusal(record)  # before reading the registry: a bad spec fails at once
    if reason is not None:
        raise RegistryError(reason)
    known = current(settings).models
    unknown = [m for m in models if m not in known]
    if unknown:
        raise RegistryError(
            f"models not deployed: {', '.join(unknown)}; deploy them first "
            "(`clipstream model deploy NAME SOURCE`)"
        )
    publish(settings, record)
    return spec


def ensure_core_topics(settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient

    topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan.of(settings).core())


def ensure_model_topic(settings: Settings, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka())
    plan = topics.TopicPlan.of(settings)
    requests = plan.topic(topics.model_requests(name), partitions, {"retention.ms": "3600000"})
    topics.ensure_topics(admin, [requests], grow=True)
