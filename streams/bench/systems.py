"""The systems measured side by side: how each is started, and how it is spoken to.

All of them run against the same broker, serve the same model file and are driven by the
same load generator; only the topics and (for the peer) the message format differ.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message
from confluent_kafka.admin import AdminClient, NewTopic

from models import registry
from streams import codec, topics
from streams.bench import peer
from streams.bench.loadgen import Protocol, Reply
from streams.config import Settings
from streams.processes import Child, clipstream_command, spawn
from streams.sdk import now_us

SYSTEMS = ("floor", "naive", "clipstream", "clipstream-cache", "peer")
DESCRIPTIONS = {
    "floor": "pass-through over the same four Kafka topics, no model",
    "naive": "confluent-kafka loop: consume one, predict one row, produce one",
    "clipstream": "worker + one replica, adaptive batching, cache off",
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
    children: dict[str, list[Child]] = field(default_factory=dict)

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


def avro_protocol(queries_topic: str, predictions_topic: str, app: str) -> Protocol:
    """Clipstream's own records: the floor and the naive loop speak them too."""

    def encode(qid: str, row: np.ndarray, deadline_ms: int) -> tuple[bytes, bytes, None]:
        record = {
            "query_id": qid,
            "app": app,
            "user": None,
            "features": row.tolist(),
            "raw": None,
            "text": None,
            "sent_at_us": now_us(),
            "deadline_ms": deadline_ms,
        }
        # keyed by query id, as the SDK does: one app's queries spread over all partitions
        return qid.encode(), codec.encode("Query", record), None

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
        return Reply(p["query_id"], p["default"], p["error"], p["cache_hit"], stages)

    return Protocol(queries_topic, predictions_topic, encode, decode)


def _topics(ctx: Context, names: list[str]) -> None:
    p = ctx.settings.partitions
    topics.ensure_topics(AdminClient(ctx.settings.kafka()), [NewTopic(n, p, 1) for n in names])


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def start(system: str, ctx: Context) -> tuple[Protocol, list[Child]]:
    """Start ``system``'s processes; returns how to talk to it and what to stop."""
    if system == "floor":
        prefix = ctx.prefix(system)
        _topics(ctx, [f"{prefix}.{t}" for t in ("queries", "hop1", "hop2", "predictions")])
        child = spawn(system, _module("streams.bench.floor", "--prefix", prefix), ctx.logs, ctx.env)
        return avro_protocol(f"{prefix}.queries", f"{prefix}.predictions", "bench"), [child]
    if system == "naive":
        prefix = ctx.prefix(system)
        _topics(ctx, [f"{prefix}.queries", f"{prefix}.predictions"])
        args = ("--model", str(ctx.model_path), "--prefix", prefix)
        child = spawn(system, _module("streams.bench.naive", *args), ctx.logs, ctx.env)
        return avro_protocol(f"{prefix}.queries", f"{prefix}.predictions", "bench"), [child]
    if system in ("clipstream", "clipstream-cache"):
        cached = system == "clipstream-cache"
        children = ctx.children.get("clipstream")
        if children is None or not all(c.alive() for c in children):
            children = _start_clipstream(ctx)
        return avro_protocol(topics.QUERIES, topics.PREDICTIONS, ctx.app(cached)), children
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
    topics.ensure_topics(AdminClient(s.kafka()), topics.TopicPlan(s.partitions).core())
    name = f"bench-{ctx.model}"
    registry.deploy_model(s, name, str(ctx.model_path), input_dim=ctx.input_dim)
    for cached in (False, True):
        # each bench query carries its own deadline, which overrides the app's
        registry.register_app(s, ctx.app(cached), [name], deadline_ms=1000, cache=cached)
    children = [
        spawn("worker", clipstream_command("worker"), ctx.logs, ctx.env),
        spawn("replica", clipstream_command("replica", "--model", name), ctx.logs, ctx.env),
    ]
    ctx.children["clipstream"] = children
    return children
