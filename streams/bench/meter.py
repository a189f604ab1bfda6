"""What a measured phase cost, per process: CPU from ``/proc`` and, for clipstream's
workers, their own Prometheus counters (queries taken in, feedback by result).

``PhaseMeter.start()`` before the first query of a phase, ``stop()`` after its last
answer: CPU seconds over the phase divided by the queries answered in it (warm-up
queries included: they were served in the same window) is the CPU per query. A worker's
idle cost is part of its figure, as it is part of what the machine pays.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from clipstream.streams.bench.cpu import children_of, cpu_seconds, pid_listening_on
from clipstream.streams.bench.jvm_gc import gc_log_of, pause_figures, read_pauses
from clipstream.streams.ops.status import Samples, delta, quantile, scrape, select
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import consume_ready

#: roles of the watched processes: the system's own, and what every system shares
SYSTEM, BROKER, LOADGEN = "system", "broker", "loadgen"
FEEDBACK_RESULTS = ("applied", "rejected", "replayed", "invalid")
#: how often a phase with feedback asks the broker whether it has all been dealt with
#: (each ask is a few broker round trips: a committed-offsets fetch and the end offsets)
SETTLE_POLL_S = 0.05


@dataclass(frozen=True)
class Watched:
    name: str
    role: str
    pid: int
    #: with its descendants (a worker's or a server's own children)
    tree: bool = True
    #: a clipstream worker's Prometheus endpoint
    metrics_url: str | None = None


def broker_pid(settings: Settings) -> int | None:
    """The broker's process, if it listens on this host."""
    host, _, port = settings.require_bootstrap().split(",")[0].rpartition(":")
    if host in ("127.0.0.1", "localhost", "") and port.isdigit():
        return pid_listening_on(int(port))
    return None


def shared_processes(settings: Settings) -> list[Watched]:
    """The load generator (this process, without the children it started) and the broker,
    if it listens on this host."""
    out = [Watched("loadgen", LOADGEN, os.getpid(), tree=False)]
    pid = broker_pid(settings)
    if pid is not None:
        out.append(Watched("broker", BROKER, pid))
    return out


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float | None]
    samples: dict[str, Samples] = field(default_factory=dict)
    #: wall-clock time (the broker's GC log is stamped with it)
    wall: float = 0.0


def _sum(samples: Samples, name: str, **match: str) -> float:
    return sum(select(samples, name, **match).values())


class PhaseMeter:
    """``settled``: whether the feedback sent so far has been dealt with, asked without
    costing the watched processes anything (``LearningDone``); a phase with feedback waits
    for it before its figures are taken."""

    def __init__(self, watched: list[Watched], settled: Callable[[], bool] | None = None) -> None:
        self.watched = watched
        self.settled = settled
        brokers = [w.pid for w in watched if w.role == BROKER]
        self.broker_gc_log = gc_log_of(brokers[0]) if brokers else None

    def snapshot(self) -> Snapshot:
        """CPU first, then the workers' metrics: a scrape costs a worker ~3 ms of CPU,
        which belongs to the bench, so it falls after the window's end."""
        at, cpu = self._cpu()
        return Snapshot(at, cpu, self._scrape(), time.time())

    def start(self) -> Snapshot:
        """The metrics first, then CPU: the scrape falls before the window's start."""
        samples = self._scrape()
        at, cpu = self._cpu()
        return Snapshot(at, cpu, samples, time.time())

    def _cpu(self) -> tuple[float, dict[str, float | None]]:
        tree = children_of()
        at = time.monotonic()
        return at, {w.name: cpu_seconds(w.pid, tree=w.tree, children=tree) for w in self.watched}

    def _scrape(self) -> dict[str, Samples]:
        return {w.name: scrape(w.metrics_url) for w in self.watched if w.metrics_url}

    def stop(
        self, before: Snapshot, answered: int, feedback_sent: int = 0, settle_s: float = 30.0
    ) -> dict[str, Any]:
        """The phase's figures; with feedback sent, first waits (up to ``settle_s``) until
        it has been dealt with, so its cost falls inside the window."""
        if feedback_sent and self.settled is not None:
            deadline = time.monotonic() + settle_s
            while not self.settled() and time.monotonic() < deadline:
                time.sleep(SETTLE_POLL_S)
        after = self.snapshot()
        figures = phase_figures(self.watched, before, after, answered, feedback_sent)
        if self.broker_gc_log is not None:
            found = read_pauses(self.broker_gc_log, before.wall, after.wall)
            figures["broker_gc"] = pause_figures(found, after.wall - before.wall)
        return figures


class LearningDone:
    """Whether the serving group has committed every feedback and observation record on
    the broker now. A worker commits one only once what it caused is on Kafka (the
    observation; the selection state it went into), so this is "applied and
    changelogged". Asked of the broker: polling the workers' metrics instead cost them
    ~3 ms of CPU per scrape, a fifth of what a burst of 1,500 records is measured at."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer(
            settings.kafka(**{"group.id": topics.SERVING_GROUP, "enable.auto.commit": False})
        )
        self.partitions = settings.partitions

    def __call__(self) -> bool:
        # feedback first: once it is all committed, every observation it made is written
        return all(self._committed(topic) for topic in (topics.FEEDBACK, topics.OBSERVATIONS))

    def _committed(self, topic: str) -> bool:
        tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        committed = self.consumer.committed(tps, timeout=10)
        for tp in committed:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            if max(tp.offset, low) < high:
                return False
        return True

    def close(self) -> None:
        self.consumer.close()


def phase_figures(
    watched: list[Watched], before: Snapshot, after: Snapshot, answered: int, feedback_sent: int
) -> dict[str, Any]:
    window = max(1e-9, after.at - before.at)
    per_query = {SYSTEM: 0.0, BROKER: None, LOADGEN: None}
    processes: dict[str, dict[str, Any]] = {}
    for w in watched:
        a, b = before.cpu.get(w.name), after.cpu.get(w.name)
        if a is None or b is None:
            continue  # not running through the whole phase: no figure rather than a wrong one
        seconds = b - a
        us = seconds * 1e6 / answered if answered else None
        processes[w.name] = {
            "role": w.role,
            "cpu_s": seconds,
            "cores": seconds / window,
            "cpu_us_per_query": us,
        }
        if us is not None:
            per_query[w.role] = (per_query[w.role] or 0.0) + us
    out: dict[str, Any] = {
        "window_s": window,
        "answered": answered,
        "processes": processes,
        "cpu_us_per_query": per_query if answered else {},
    }
    if after.samples:
        counts = {n: delta(before.samples[n], s) for n, s in after.samples.items()}
        queries = {n: _sum(c, "clipstream_queries_total") for n, c in counts.items()}
        total = sum(queries.values())
        out["workers"] = {
            n: {
                "queries": int(q),
                "share": q / total if total else None,
                "cpu_us_per_own_query": processes[n]["cpu_s"] * 1e6 / q
                if q and n in processes
                else None,
                "feedback_applied": int(
                    _sum(counts[n], "clipstream_feedback_total", result="applied")
                ),
            }
            for n, q in queries.items()
        }
        # how far behind the selection states each worker chooses from are (the changelog
        # record's timestamp to the worker reading it), over all workers
        buckets: dict[float, float] = {}
        for c in counts.values():
            for labels, v in select(
                c, "clipstream_selection_state_staleness_seconds_bucket"
            ).items():
                bound = float(dict(labels)["le"])
                buckets[bound] = buckets.get(bound, 0.0) + v
        if buckets and max(buckets.values()) > 0:
            out["state_staleness_ms"] = {
                "updates_read": int(max(buckets.values())),
                "p50": 1000 * (quantile(0.5, buckets) or 0.0),
                "p99": 1000 * (quantile(0.99, buckets) or 0.0),
            }
        results = {
            r: sum(_sum(c, "clipstream_feedback_total", result=r) for c in counts.values())
            for r in FEEDBACK_RESULTS
        }
        if feedback_sent or any(results.values()):
            worker_s = sum(p["cpu_s"] for n, p in processes.items() if n in counts)
            out["feedback"] = {
                "sent": feedback_sent,
                **{r: int(v) for r, v in results.items()},
                "lost": max(0, feedback_sent - int(sum(results.values()))),
                "applied_per_s": results["applied"] / window,
                "workers_cpu_s": worker_s,
            }
    return out


class DeadLetters:
    """Counts dead letters by stage from the moment it is made (reads from the end)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer(
            settings.kafka(**{"group.id": "bench-deadletters", "enable.auto.commit": False})
        )
        parts = self.consumer.list_topics(topics.DEADLETTER, timeout=30).topics
        self.partitions = list(parts[topics.DEADLETTER].partitions)
        self.start = {p: self._end(p) for p in self.partitions}
        self.consumer.assign(
            [TopicPartition(topics.DEADLETTER, p, o) for p, o in self.start.items()]
        )

    def _end(self, partition: int) -> int:
        tp = TopicPartition(topics.DEADLETTER, partition)
        return self.consumer.get_watermark_offsets(tp, timeout=30)[1]

    def count(self, timeout: float = 10.0) -> dict[str, int]:
        """Stage -> dead letters written since this reader was made, up to the current end."""
        ends = {p: self._end(p) for p in self.partitions}
        stages: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consume_ready(self.consumer, 1000, 0.1):
                if msg.error() is None:
                    stage = codec.decode("DeadLetter", msg.value())["stage"]
                    stages[stage] = stages.get(stage, 0) + 1
            positions = self.consumer.position(
                [TopicPartition(topics.DEADLETTER, p) for p in self.partitions]
            )
            # before its first fetch a partition has no position yet (a negative offset)
            if all(
                max(tp.offset, self.start[tp.partition]) >= ends[tp.partition] for tp in positions
            ):
                break
        return stages

    def close(self) -> None:
        self.consumer.close()
