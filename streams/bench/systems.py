"""The systems measured side by side: how each is started, and how it is spoken to.

All of them run against the same broker, serve the same model file and are driven by the
same load generator; only the topics and (for the peer) the message format differ.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import ConsumerGroupState, Message
from confluent_kafka.admin import AdminClient

from clipstream.models.control import registry
from clipstream.streams.bench import peer
from clipstream.streams.bench.loadgen import Protocol, Reply
from clipstream.streams.bench.meter import SYSTEM, Watched, shared_processes
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings

SYSTEMS = ("floor", "naive", "clipstream", "clipstream-cache", "peer")
DESCRIPTIONS = {
    "floor": "pass-through over the same four Kafka topics, no model",
    "naive": "confluent-kafka loop: consume one, predict one row, produce one",
    "clipstream": "worker(s) + one replica per worker, adaptive batching, cache off",
    "clipstream-cache": "the same worker and replica, prediction cache on",
    "peer": "MLServer 1.7.1 Kafka server, adaptive batching (256 rows, 2 ms)",
}


@dataclass
class Context:
    """What every system is given: one broker, one model, one place for files."""

    settings: Settings
    workdir: Path
    run_id: str
    model: str
    model_path: Path
    estimator: Any
    input_dim: int
    #: clipstream's workers (each with a replica of the model)
    workers: int = 1
    children: dict[str, list[Child]] = field(default_factory=dict)
    #: child name -> its Prometheus endpoint (clipstream's workers)
    metrics_urls: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.settings.require_bootstrap(),
            "CLIPSTREAM_PARTITIONS": str(self.settings.partitions),
        }

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def prefix(self, system: str) -> str:
        return f"bench.{self.run_id}.{system}"

    def app(self, cached: bool) -> str:
        return f"bench-{self.model}-{'cache' if cached else 'nocache'}"

    def watched(self, children: list[Child]) -> list[Watched]:
        """What a phase of a system is metered on: its processes, the broker, the client."""
        own = [
            Watched(c.name, SYSTEM, c.pid, metrics_url=self.metrics_urls.get(c.name))
            for c in children
        ]
        return own + shared_processes(self.settings)


def user_of(qid: str, users: int) -> str | None:
    """The user a bench query speaks for: spread evenly by its random id, and found again
    from the id alone when its feedback is written."""
    return f"user-{int(qid[:8], 16) % users}" if users else None


def avro_protocol(
    queries_topic: str,
    predictions_topic: str,
    app: str,
    *,
    users: int = 0,
    labels: np.ndarray | None = None,
    key_by_input: bool = False,
) -> Protocol:
    """Clipstream's own records: the floor and the naive loop speak them too.

    ``users``: queries speak for that many users (a personalised app); ``labels``: the
    true label of each input row, for feedback; ``key_by_input``: queries keyed by a hash
    of their input, so a repeated input reaches the worker whose cache holds its answer
    (each worker has its own cache; keyed by query id, a repeat finds it 1/N of the time)."""

    def encode(qid: str, row: np.ndarray, deadline_ms: int) -> tuple[bytes, bytes, None]:
        user = user_of(qid, users)
        record = {
            "query_id": qid,
            "app": app,
            "user": user,
            "features": row.tolist(),
            "raw": None,
            "text": None,
            "sent_at_us": now_us(),
            "deadline_ms": deadline_ms,
        }
        if key_by_input:
            key = hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest().encode()
        else:
            # keyed by query id, as the SDK does: one app's queries spread over all partitions
            key = qid.encode()
        return key, codec.encode("Query", record), None

    def decode(msg: Message) -> Reply | None:
        received = time.time_ns() // 1000
        p = codec.decode("Prediction", msg.value())
        if p["app"] != app:
            return None
        stages = None
        if p["emitted_at_us"] and p["sent_at_us"]:
            intake = p["emitted_at_us"] - p["worker_us"]
            stages = (
                intake - p["sent_at_us"],
                p["worker_us"],
                received - p["emitted_at_us"],
            )
        full = bool(p["answers"]) and all(a["error"] is None for a in p["answers"])
        return Reply(p["query_id"], p["default"], p["error"], p["cache_hit"], stages, full)

    def feedback(qid: str, row: int) -> tuple[str, bytes, bytes]:
        assert labels is not None
        user = user_of(qid, users)
        record = {
            "query_id": qid,
            "app": app,
            "user": user,
            "label": str(labels[row]),
            "reward": None,
            "sent_at_us": now_us(),
        }
        # keyed like its query (by query id): it reaches the worker that answered it
        return topics.FEEDBACK, qid.encode(), codec.encode("Feedback", record)

    return Protocol(
        queries_topic, predictions_topic, encode, decode, None if labels is None else feedback
    )


def _topics(ctx: Context, names: list[str]) -> None:
    plan = topics.TopicPlan.of(ctx.settings)
    wanted = [plan.topic(n, plan.partitions) for n in names]
    topics.ensure_topics(AdminClient(ctx.settings.kafka()), wanted)


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def start(system: str, ctx: Context) -> tuple[Protocol, list[Child]]:
    """Start ``system``'s processes; returns how to talk to it and what to stop."""
    if system == "floor":
        prefix = ctx.prefix(system)
        _topics(ctx, [f"{prefix}.{t}" for t in ("queries", "hop1", "hop2", "predictions")])
        floor = _module("clipstream.streams.bench.floor", "--prefix", prefix)
        child = spawn(system, floor, ctx.logs, ctx.env)
        return avro_protocol(f"{prefix}.queries", f"{prefix}.predictions", "bench"), [child]
    if system == "naive":
        prefix = ctx.prefix(system)
        _topics(ctx, [f"{prefix}.queries", f"{prefix}.predictions"])
        args = ("--model", str(ctx.model_path), "--prefix", prefix)
        child = spawn(system, _module("clipstream.streams.bench.naive", *args), ctx.logs, ctx.env)
        return avro_protocol(f"{prefix}.queries", f"{prefix}.predictions", "bench"), [child]
    if system in ("clipstream", "clipstream-cache"):
        cached = system == "clipstream-cache"
        children = ctx.children.get("clipstream")
        if children is None or not all(c.alive() for c in children):
            children = _start_clipstream(ctx)
        protocol = avro_protocol(
            topics.QUERIES, topics.PREDICTIONS, ctx.app(cached), key_by_input=cached
        )
        return protocol, children
    if system == "peer":
        prefix = ctx.prefix(system)
        binary = peer.ensure_installed(ctx.logs / "peer-install.log")
        _topics(ctx, [f"{prefix}.queries", f"{prefix}.predictions"])
        root = peer.write_config(
            ctx.workdir / "peer", ctx.estimator, ctx.model, ctx.settings.require_bootstrap(), prefix
        )
        child = spawn(system, [str(binary), "start", str(root)], ctx.logs, ctx.env)
        return peer.protocol(prefix, ctx.model), [child]
    raise ValueError(f"unknown system {system!r}; one of {', '.join(SYSTEMS)}")


def _start_clipstream(ctx: Context) -> list[Child]:
    s = ctx.settings
    topics.ensure_topics(AdminClient(s.kafka()), topics.TopicPlan.of(s).core())
    name = f"bench-{ctx.model}"
    registry.deploy_model(s, name, str(ctx.model_path), input_dim=ctx.input_dim)
    for cached in (False, True):
        # each bench query carries its own deadline, which overrides the app's
        registry.register_app(s, ctx.app(cached), [name], deadline_ms=1000, cache=cached)
    children, urls = spawn_clipstream(ctx.logs, ctx.env, ctx.workers, {name: ctx.workers})
    ctx.children["clipstream"] = children
    ctx.metrics_urls.update(urls)
    wait_for_workers(s, ctx.workers)
    return children


def spawn_clipstream(
    logs: Path, env: dict[str, str], workers: int, replicas: dict[str, int]
) -> tuple[list[Child], dict[str, str]]:
    """``workers`` workers, each serving Prometheus metrics on a port of its own, and
    ``replicas[model]`` replicas of each model; returns them and the workers' endpoints."""
    children, urls, ports = [], {}, []
    for i in range(workers):
        ports.append(free_port(exclude=tuple(ports)))
        name = "worker" if workers == 1 else f"worker-{i}"
        command = clipstream_command("worker", "--metrics-port", str(ports[-1]))
        children.append(spawn(name, command, logs, env))
        urls[name] = f"http://127.0.0.1:{ports[-1]}/metrics"
    for model, n in replicas.items():
        for i in range(n):
            name = f"replica-{model}" if n == 1 else f"replica-{model}-{i}"
            children.append(spawn(name, clipstream_command("replica", "--model", model), logs, env))
    return children, urls


def wait_for_workers(settings: Settings, workers: int, timeout: float = 120.0) -> None:
    """Until the workers' consumer group is stable with all of them in it, so no phase is
    measured while partitions move."""
    admin = AdminClient(settings.kafka())
    deadline = time.monotonic() + timeout
    seen = "no group yet"
    while time.monotonic() < deadline:
        group_id = topics.SERVING_GROUP
        future = admin.describe_consumer_groups([group_id])[group_id]
        try:
            group = future.result(10)
        except Exception as exc:  # the group is not formed yet
            seen = str(exc)
        else:
            seen = f"{group.state.name} with {len(group.members)} members"
            if group.state == ConsumerGroupState.STABLE and len(group.members) == workers:
                return
        time.sleep(0.2)
    raise TimeoutError(f"worker group not stable with {workers} members: {seen}")
