"""Settings shared by every process, read from the environment (flags override them).

Every Kafka client (the SDK's, the worker's, the replicas', the tools') is built from the same
``Settings`` so that TLS and SASL reach all of them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "CLIPSTREAM_"

#: librdkafka's own log lines, which it would otherwise write to stderr
KAFKA_LOGGER = "clipstream.librdkafka"


@dataclass
class Settings:
    """Process-wide settings. Field ``x`` is read from ``CLIPSTREAM_X`` (bootstrap from
    ``KAFKA_BOOTSTRAP_SERVERS``)."""

    bootstrap: str | None = None
    partitions: int = 4
    replica_partitions: int = 4
    #: replicas per partition of the topics clipstream creates; 0: the cluster's
    #: default.replication.factor. A worker refuses existing topics with fewer
    replication_factor: int = 0
    #: min.insync.replicas of the topics clipstream creates; 0: the cluster's default
    min_insync_replicas: int = 0
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    metrics_port: int = 0
    web_port: int = 0
    #: the worker's Clipper-compatible REST frontend (gateway.clipper): Clipper's 1337
    #: where free (skipped with a warning when taken); 0: a free port; -1: off
    clipper_port: int = 1337
    gateway_margin_ms: float = 500.0
    #: "tokens" (every REST request needs a bearer token) or "open" (gateway.auth)
    gateway_auth: str = "tokens"
    gateway_tokens_file: str | None = None
    gateway_tokens: str | None = None
    gateway_certfile: str | None = None
    gateway_keyfile: str | None = None
    metrics_urls: str = ""
    batch_max: int = 256
    batch_wait_ms: float = 2.0
    #: an idle model's row waits up to this long for a second one while the model's rows
    #: come closer together than this (worker.batching.BatchPolicy); 0 (the default):
    #: never. It saves CPU where the machine is short of it and costs about one arrival
    #: gap of latency (docs/benchmarks.md, "An idle model's wait")
    batch_idle_wait_ms: float = 0.0
    #: batches a model may have in flight per live replica: one, as in Clipper (a second
    #: slot hid the Kafka round trip but filled with one-row batches, so a model with a
    #: costly call spent its time on per-call overhead: bench sweeps, slots 1 vs 2)
    inflight_per_replica: int = 1
    #: a query is answered this long before its deadline, so the answer reaches the app by
    #: the deadline (at most a quarter of the deadline)
    emit_margin_ms: float = 2.0
    #: the session timeout of the serving group and the replicas' groups: how long a
    #: crashed member's partitions go unserved (raised to the broker's minimum)
    session_timeout_ms: int = 2000
    #: how long the broker holds a worker's fetch of feedback, observations and selection
    #: states to gather a batch (clipstream.streams.learning.feed): the weights a query is chosen by
    #: lag feedback by up to about three of these; 0: the broker does not hold the fetch.
    #: A second, not 250 ms: a third to a half less of the workers' CPU per feedback record
    #: at a steady rate, and a higher rate at the latency objective (docs/benchmarks.md,
    #: "The learning batch of a second, taken")
    learn_batch_ms: float = 1000.0
    cache_size: int = 100_000
    #: query ids answered, remembered so a redelivered query is not answered twice
    dedup_memory: int = 500_000
    #: answers remembered per learning app's query, for its feedback
    answer_memory: int = 200_000
    answer_ttl_s: float = 3600.0
    # rebuild emitted ids and answers from the predictions topic on partition assignment
    # (clipstream.streams.worker.dedup); off only to measure what it costs
    dedup: bool = True
    trust_pickle: bool = False
    #: comma-separated types a skops model file may need beyond the built-in allowlist
    trusted_types: str | None = None
    #: where replicas keep verified model files, by digest (default ~/.cache/clipstream/artifacts)
    artifact_cache: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            env = (
                "KAFKA_BOOTSTRAP_SERVERS" if f.name == "bootstrap" else ENV_PREFIX + f.name.upper()
            )
            raw = os.environ.get(env)
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def require_bootstrap(self) -> str:
        if not self.bootstrap:
            raise RuntimeError(
                "no Kafka cluster configured: set KAFKA_BOOTSTRAP_SERVERS or run "
                "`clipstream broker start`"
            )
        return self.bootstrap

    def trusted_type_list(self) -> list[str]:
        return [t.strip() for t in (self.trusted_types or "").split(",") if t.strip()]

    def kafka(self, **extra: Any) -> dict[str, Any]:
        """librdkafka configuration (confluent-kafka)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.require_bootstrap(),
            "logger": logging.getLogger(KAFKA_LOGGER),
        }
        if self.security_protocol != "PLAINTEXT":
            conf["security.protocol"] = self.security_protocol
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username or ""
            conf["sasl.password"] = self.sasl_password or ""
        if self.ssl_cafile:
            conf["ssl.ca.location"] = self.ssl_cafile
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = self.ssl_certfile
        if self.ssl_keyfile:
            conf["ssl.key.location"] = self.ssl_keyfile
        conf.update(self.extra)
        conf.update(extra)
        return conf


def _coerce(kind: Any, raw: str) -> Any:
    text = str(kind)
    if text.startswith("bool"):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if text.startswith("int"):
        return int(raw)
    if text.startswith("float"):
        return float(raw)
    return raw
