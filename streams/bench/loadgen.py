"""The open-loop load generator every system is measured with.

Queries leave on a schedule (constant gaps, or Poisson arrivals at the target rate) that
does not wait for answers, as real clients do; a query that is late to leave because the
client fell behind is sent at once rather than skipped, so a slow system cannot slow its
own load down. A separate thread reads the answers. Each query's latency is taken at the
client, from just before its send to its answer's receipt, with one monotonic clock.
Queries sent during the warm-up are served but not counted.

The same code drives every system; a ``Protocol`` only says which topics to use and how
to write a query and read an answer.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from clipstream.streams.bench.meter import PhaseMeter
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import FETCH_WAIT_MS, consume_ready

#: latency histogram bucket edges in ms: log-spaced from 0.1 ms to 100 s
HIST_EDGES_MS = np.round(np.logspace(-1, 5, 121), 4)


@dataclass(frozen=True)
class Reply:
    query_id: str
    default: bool = False
    error: str | None = None
    cache_hit: bool = False
    #: where the time went, from the record's own stamps (us): client to worker intake,
    #: inside the worker (batching, replica round trip, merge), worker emit to receipt
    stages_us: tuple[int, int, int] | None = None
    #: an ensemble's answer in which every consulted model answered (None: not said)
    full: bool | None = None


@dataclass
class Protocol:
    """How one system is spoken to over Kafka."""

    queries_topic: str
    predictions_topic: str
    #: (query id, input row, deadline ms) -> (key, value, headers)
    encode: Callable[[str, np.ndarray, int], tuple[bytes | None, bytes, list | None]]
    #: an answer message -> Reply (None: not an answer to a bench query)
    decode: Callable[[Message], Reply | None]
    #: (query id, index of its input row) -> the feedback record (topic, key, value)
    feedback: Callable[[str, int], tuple[str, bytes, bytes]] | None = None


@dataclass
class LoadResult:
    system: str
    rate: float | None  # offered queries/s; None for a burst
    arrivals: str
    duration_s: float
    sent: int
    received: int
    throughput_qps: float
    received_qps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    deadline_ms: int
    deadline_misses: int
    defaults: int
    errors: int
    lost: int
    duplicates: int
    cache_hits: int
    #: answers in which every consulted model answered (ensembles; 0 for other systems)
    full_ensembles: int = 0
    #: the latest answer beyond the query's deadline, at the client (receipt minus send)
    #: and at the worker (its emit stamp minus the query's send stamp); negative: in time
    max_late_client_ms: float | None = None
    max_late_worker_ms: float | None = None
    feedback_sent: int = 0
    stages_p50_us: dict[str, float] = field(default_factory=dict)
    histogram: dict[str, list[float]] = field(default_factory=dict)
    #: what the phase cost per process (clipstream.streams.bench.meter), when it was metered
    cost: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    #: query id -> input row of every answer by a model (to send feedback for them later)
    answered_rows: dict[str, int] = field(default_factory=dict, repr=False)

    def figures(self) -> dict[str, Any]:
        """Everything but the raw latencies (the histogram stands for them) and ids."""
        out = dict(self.__dict__)
        out.pop("latencies_ms")
        out.pop("answered_rows")
        return out


class _Receiver(threading.Thread):
    """Reads answers and stamps their receipt time; librdkafka releases the GIL in poll."""

    def __init__(
        self,
        settings: Settings,
        protocol: Protocol,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> None:
        super().__init__(name="bench-receiver", daemon=True)
        self.protocol = protocol
        self.on_reply = on_reply
        self.consumer = Consumer(
            settings.kafka(
                **{
                    "group.id": f"bench-client-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                    "enable.partition.eof": False,
                }
            )
        )
        topic = protocol.predictions_topic
        parts = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        assignment = []
        for p in parts:
            # from the current end: only answers to this run are read
            high = _end_offset(self.consumer, TopicPartition(topic, p))
            assignment.append(TopicPartition(topic, p, high))
        self.consumer.assign(assignment)
        self.received: dict[str, tuple[int, Reply]] = {}
        self.duplicates = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        decode, on_reply = self.protocol.decode, self.on_reply
        received = self.received
        while not self.stopping.is_set():
            msgs = consume_ready(self.consumer, 1000, 0.05)
            now = time.perf_counter_ns()
            for msg in msgs:
                if msg.error():
                    continue
                reply = decode(msg)
                if reply is None:
                    continue
                if reply.query_id in received:
                    self.duplicates += 1
                else:
                    received[reply.query_id] = (now, reply)
                    if on_reply is not None:
                        on_reply(reply)

    def close(self) -> None:
        self.stopping.set()
        self.join(10)
        self.consumer.close()


def _stage_medians(replies: list[Reply]) -> dict[str, float]:
    stamped = np.array([r.stages_us for r in replies if r.stages_us is not None], dtype=float)
    if not len(stamped):
        return {}
    names = ("client_to_worker", "in_worker", "worker_to_client")
    return {n: float(v) for n, v in zip(names, np.median(stamped, axis=0), strict=True)}


def _end_offset(consumer: Consumer, tp: TopicPartition, timeout: float = 30.0) -> int:
    """The partition's end offset; a topic created a moment ago may not have a leader yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)[1]
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def schedule(rate: float, n: int, arrivals: str, seed: int = 0) -> np.ndarray:
    """Send offsets in seconds from the start for ``n`` queries at ``rate`` per second."""
    if arrivals == "constant":
        return np.arange(n) / rate
    if arrivals == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
        return np.cumsum(gaps) - gaps[0]
    raise ValueError(f"unknown arrivals {arrivals!r}: constant or poisson")


def run_load(
    settings: Settings,
    system: str,
    protocol: Protocol,
    X: np.ndarray,
    *,
    rate: float | None,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    burst: int = 5000,
    arrivals: str = "constant",
    deadline_ms: int = 1000,
    grace_s: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
    feedback: bool = False,
    meter: PhaseMeter | None = None,
) -> LoadResult:
    """Drive one system; ``rate=None`` sends ``burst`` queries as fast as the client can
    (after the warm-up at a gentle rate), which measures the system's capacity.

    With ``feedback`` (and a protocol that can write it) every answer by a model is
    followed by one feedback record with its row's true label, sent as it arrives. With a
    ``meter`` the phase's cost per process is measured from the first send until every
    answer (and every feedback record) has been dealt with."""
    producer = Producer(
        settings.kafka(**{"linger.ms": 1, "enable.idempotence": True, "acks": "all"})
    )
    row_of: dict[str, int] = {}
    feedback_sent = 0
    on_reply = None
    if feedback and protocol.feedback is not None:
        write_feedback = protocol.feedback

        def on_reply(reply: Reply) -> None:
            nonlocal feedback_sent
            row = row_of.get(reply.query_id)  # None: a late answer to an earlier phase's query
            if row is not None and reply.error is None and not reply.default:
                produce(producer, *write_feedback(reply.query_id, row))
                feedback_sent += 1

    receiver = _Receiver(settings, protocol, on_reply)
    receiver.start()
    warm_rate = min(rate or 200.0, 200.0)
    n_warm = max(1, int(warmup_s * warm_rate))
    if rate is None:
        offsets = np.concatenate(
            [schedule(warm_rate, n_warm, "constant"), np.full(burst, warmup_s)]
        )
    else:
        offsets = np.concatenate(
            [
                schedule(warm_rate, n_warm, "constant"),
                warmup_s + schedule(rate, max(1, int(duration_s * rate)), arrivals),
            ]
        )
    sent: dict[str, int] = {}
    measured: list[str] = []
    encode, topic = protocol.encode, protocol.queries_topic
    rows = len(X)
    phase_start = meter.start() if meter is not None else None
    start = time.perf_counter_ns()
    last_report = 0
    for i, offset in enumerate(offsets):
        due = start + int(offset * 1e9)
        while (left := due - time.perf_counter_ns()) > 0:
            # wait without spinning: a busy loop here took most of a core from the
            # systems measured (librdkafka's poll has millisecond resolution, so the last
            # stretch is a plain sleep, which the kernel ends within tens of microseconds)
            if left > 1_500_000:
                producer.poll((left - 1_000_000) / 1e9)
            else:
                time.sleep(left / 1e9)
        qid = uuid.uuid4().hex
        row_of[qid] = i % rows
        key, value, headers = encode(qid, X[i % rows], deadline_ms)
        sent[qid] = time.perf_counter_ns()
        produce(producer, topic, key, value, headers)
        if i >= n_warm:
            measured.append(qid)
        if progress is not None and i - last_report >= 50:
            last_report = i
            progress(i + 1, len(receiver.received))
    producer.flush(30)
    send_end = time.perf_counter_ns()
    wait_until = time.monotonic() + grace_s + deadline_ms / 1000
    missing = list(measured)
    while time.monotonic() < wait_until:
        missing = [q for q in missing if q not in receiver.received]
        if not missing:
            break
        if progress is not None:
            progress(len(offsets), len(receiver.received))
        time.sleep(0.05)
    receiver.close()
    producer.flush(30)  # the last feedback records
    cost: dict[str, Any] = {}
    if meter is not None and phase_start is not None:
        # the answers to this phase's queries, warm-up included; not late answers to
        # queries of an earlier phase (a readiness probe, say) that arrived meanwhile
        answered = sum(q in row_of for q in receiver.received)
        cost = meter.stop(phase_start, answered, feedback_sent)
    if progress is not None:
        progress(len(offsets), len(receiver.received))
    got = [(q, receiver.received[q]) for q in measured if q in receiver.received]
    lat = np.array([(t - sent[q]) / 1e6 for q, (t, _) in got]) if got else np.array([])
    replies = [r for _, (_, r) in got]
    first_send = sent[measured[0]] if measured else start
    last_done = max((t for _, (t, _) in got), default=send_end)
    window_s = max(1e-9, (last_done - first_send) / 1e9)
    counts, _ = np.histogram(lat, bins=HIST_EDGES_MS)
    pct = (
        np.percentile(lat, [50, 90, 99, 99.9]) if len(lat) else np.full(4, float("nan"))
    ).tolist()
    in_worker = [r.stages_us[0] + r.stages_us[1] for r in replies if r.stages_us is not None]
    return LoadResult(
        system=system,
        rate=rate,
        arrivals=arrivals if rate is not None else "burst",
        duration_s=round(window_s, 3),
        sent=len(measured),
        received=len(got),
        # answered by a model: default outputs and errors are counted, not credited
        throughput_qps=sum(r.error is None and not r.default for r in replies) / window_s,
        received_qps=len(got) / window_s,
        p50_ms=pct[0],
        p90_ms=pct[1],
        p99_ms=pct[2],
        p999_ms=pct[3],
        mean_ms=float(lat.mean()) if len(lat) else float("nan"),
        max_ms=float(lat.max()) if len(lat) else float("nan"),
        deadline_ms=deadline_ms,
        deadline_misses=int((lat > deadline_ms).sum()),
        defaults=sum(r.default for r in replies),
        errors=sum(r.error is not None for r in replies),
        lost=len(measured) - len(got),
        duplicates=receiver.duplicates,
        cache_hits=sum(r.cache_hit for r in replies),
        full_ensembles=sum(bool(r.full) for r in replies),
        max_late_client_ms=float(lat.max()) - deadline_ms if len(lat) else None,
        max_late_worker_ms=max(in_worker) / 1000 - deadline_ms if in_worker else None,
        feedback_sent=feedback_sent,
        stages_p50_us=_stage_medians(replies),
        histogram={"edges_ms": HIST_EDGES_MS.tolist(), "counts": counts.tolist()},
        cost=cost,
        latencies_ms=lat.tolist(),
        answered_rows={q: row_of[q] for q, (_, r) in got if r.error is None and not r.default},
    )


def produce(
    producer: Producer, topic: str, key: bytes | None, value: bytes, headers: list | None = None
) -> None:
    """Produce, waiting for room when the client's local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key, headers=headers)
            break
        except BufferError:
            producer.poll(0.01)
    producer.poll(0)


def wait_ready(
    settings: Settings, protocol: Protocol, X: np.ndarray, timeout: float = 120.0
) -> float:
    """Probe until the system answers (group joins, model loads); returns seconds waited."""
    producer = Producer(settings.kafka(**{"linger.ms": 0}))
    receiver = _Receiver(settings, protocol)
    receiver.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            key, value, headers = protocol.encode(uuid.uuid4().hex, X[0], int(timeout * 1000))
            producer.produce(protocol.queries_topic, value, key, headers=headers)
            producer.flush(5)
            probe_until = time.monotonic() + 1.0
            while time.monotonic() < probe_until:
                if receiver.received:
                    return time.monotonic() - started
                time.sleep(0.02)
        raise TimeoutError(f"{protocol.queries_topic}: no answer within {timeout:.0f}s")
    finally:
        receiver.close()
