"""Fault tolerance under steady load (DESIGN.md invariants 1 and 3, docs/guarantees.md).

Each test runs queries over several users of a personalised Exp4 app at a steady rate,
sends feedback for every prediction as it arrives, injects one fault, and then checks on
the RAW predictions topic (not through the SDK's de-duplicating reader) that every query id
has exactly one prediction, and that the bandit weights the worker stored equal those a
replay of the feedback topic computes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from models import registry
from models.training import digits_split
from selection import SelectionState
from streams import codec, topics
from streams.broker import EmbeddedBroker
from streams.config import Settings
from streams.kafka_util import consume_ready
from streams.replay import replay
from streams.sdk import Client, PredictionReader
from tests.conftest import wait_for
from tests.integration.helpers import read_all, wait_until_serving

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MODELS = ["digits-logreg", "digits-weak"]
USERS = [f"u{i}" for i in range(8)]  # spread over all four partitions
CHANGELOG = topics.SELECTION_CHANGELOG


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_settings(broker: EmbeddedBroker, digits_models) -> Settings:
    """This module's own broker (a test restarts it), with the models deployed."""
    settings = Settings(bootstrap=broker.bootstrap, partitions=4, replica_partitions=4)
    topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan(4).core())
    for name in MODELS:
        registry.deploy_model(settings, name, str(digits_models[name][0]), input_dim=64)
    return settings


class Load:
    """Queries at a steady rate from a thread; a second thread reads the raw predictions
    topic and sends each answered query's feedback (its true label) as it arrives."""

    def __init__(self, settings: Settings, app: str, rate: float = 30.0) -> None:
        self.settings, self.app, self.rate = settings, app, rate
        _, self.X, _, self.y = digits_split()
        self.queries = Client(settings)
        self.feedback = Client(settings)
        self.reader = PredictionReader(settings)  # positioned at the end before any query
        self.truth: dict[str, str] = {}
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.sending = threading.Event()
        self.reading = threading.Event()
        # while set, feedback is kept back (sent once cleared), so that it reaches a worker
        # that did not answer its query
        self.hold_feedback = threading.Event()
        self.held: list[tuple[str, str, str]] = []
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._guard(self._send), daemon=True),
            threading.Thread(target=self._guard(self._read), daemon=True),
        ]

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced by the test
                self.errors.append(exc)

        return run

    def __enter__(self) -> Load:
        self.sending.set()
        self.reading.set()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sending.clear()
        self.reading.clear()
        for thread in self.threads:
            thread.join(30)
        self.reader.close()

    def _send(self) -> None:
        i = 0
        next_at = time.monotonic()
        while self.sending.is_set():
            row = i % len(self.X)
            with self.lock:
                qid = self.queries.send_query(
                    self.app, self.X[row].tolist(), user=USERS[i % len(USERS)]
                )
                self.truth[qid] = str(self.y[row])
            i += 1
            next_at += 1 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing, not synchronisation
        self.queries.flush(60)

    def _read(self) -> None:
        while self.reading.is_set():
            for msg in consume_ready(self.reader.consumer, 500, 0.2):
                if msg.error():
                    continue
                record = codec.decode("Prediction", msg.value())
                qid = record["query_id"]
                with self.lock:
                    label = self.truth.get(qid)
                    if label is None:
                        continue
                    self.seen[qid] += 1
                    first = self.seen[qid] == 1
                if first:
                    self.held.append((qid, label, record["user"]))
            if not self.hold_feedback.is_set():
                for qid, label, user in self.held:
                    self.feedback.send_feedback(qid, self.app, label=label, user=user)
                self.held.clear()
            self.feedback.producer.poll(0)
        for qid, label, user in self.held:
            self.feedback.send_feedback(qid, self.app, label=label, user=user)
        self.feedback.flush(60)

    def sent(self) -> int:
        with self.lock:
            return len(self.truth)

    def answered(self) -> int:
        with self.lock:
            return len(self.seen)

    def stop_sending(self) -> None:
        self.sending.clear()
        self.threads[0].join(90)

    def all_answered(self) -> bool:
        with self.lock:
            return set(self.truth) <= set(self.seen)


def group_caught_up(settings: Settings, topic: str, group: str = topics.SERVING_GROUP) -> bool:
    """True once ``group`` has committed every offset of ``topic``."""
    consumer = Consumer(settings.kafka(**{"group.id": group, "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        for c in consumer.committed(tps, timeout=10):
            high = consumer.get_watermark_offsets(TopicPartition(topic, c.partition), timeout=10)[1]
            if high > 0 and c.offset < high:
                return False
        return True
    except Exception:  # the broker may be restarting: not caught up yet
        return False
    finally:
        consumer.close()


def learnt_everything(settings: Settings) -> bool:
    """Every feedback record joined to its answers by the serving group, and every
    observation folded into its key's state by the learning (Faust) group."""
    return group_caught_up(settings, topics.FEEDBACK) and group_caught_up(
        settings, topics.OBSERVATIONS, topics.FAUST_APP
    )


def stored_weights(settings: Settings, app: str) -> dict[str, dict[str, float]]:
    """Selection key -> weights, from the last record per key of the table's changelog
    (what a restarted worker recovers)."""
    latest: dict[str, dict] = {}
    consumer = Consumer(
        settings.kafka(**{"group.id": f"test-{time.time_ns()}", "enable.auto.commit": False})
    )
    try:
        parts = consumer.list_topics(CHANGELOG, timeout=10).topics[CHANGELOG].partitions
        ends, assignment = {}, []
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(CHANGELOG, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(CHANGELOG, p, low))
        consumer.assign(assignment)
        deadline = time.monotonic() + 30
        while ends and time.monotonic() < deadline:
            for msg in consume_ready(consumer, 1000, 0.2):
                if msg.error():
                    continue
                key = msg.key().decode()  # the table's keys are the selection keys' bytes
                if key.split("|")[0] == app and msg.value() is not None:
                    latest[key] = json.loads(msg.value())
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
    finally:
        consumer.close()
    return {k: SelectionState.from_state(v).weights() for k, v in latest.items()}


def check_promise(settings: Settings, load: Load) -> dict[str, int]:
    """Exactly one prediction per query id on the raw topic, and stored weights equal to a
    replay of the feedback. Returns counts for the test to report."""
    load.stop_sending()
    wait_for(load.all_answered, 120, "a prediction for every query", interval=0.2)
    # every query acknowledged: nothing left that could be redelivered and answered again
    wait_for(lambda: group_caught_up(settings, topics.QUERIES), 60, "query offsets committed")
    load.reading.clear()
    load.threads[1].join(60)
    assert not load.errors, load.errors

    wanted = set(load.truth)
    per_query = Counter(
        r["query_id"] for r in read_all(settings, topics.PREDICTIONS, "Prediction", 30)
    )
    missing = wanted - set(per_query)
    duplicated = {q: n for q, n in per_query.items() if q in wanted and n > 1}
    assert not missing, f"{len(missing)} of {len(wanted)} queries have no prediction"
    assert not duplicated, f"{len(duplicated)} queries have several predictions: {duplicated}"

    wait_for(lambda: learnt_everything(settings), 60, "feedback applied")
    replayed, counts = replay(settings, load.app, dry_run=True)
    assert counts["applied"] == len(wanted), counts  # no feedback lost or unknown
    expected = {key: state.weights() for key, state in replayed.items()}
    assert set(expected) == {f"{load.app}|{u}" for u in USERS}
    last: dict = {}

    def weights_match() -> bool:
        last["stored"] = stored_weights(settings, load.app)
        return last["stored"] == expected  # bit for bit: same updates in the same order

    try:
        wait_for(weights_match, 30, "stored weights equal to the replay", interval=0.5)
    except AssertionError:
        differ = {
            k: (last["stored"].get(k), w) for k, w in expected.items() if last["stored"].get(k) != w
        }
        raise AssertionError(f"stored vs replayed weights differ: {differ}") from None
    # feedback for queries answered before a fault was applied, not dead-lettered as unknown
    rejected = [
        d["reason"]
        for d in read_all(settings, topics.DEADLETTER, "DeadLetter", 30)
        if d["stage"] == "feedback" and d["query_id"] in wanted
    ]
    assert not rejected, rejected[:5]
    ours = [
        r
        for r in read_all(settings, topics.PREDICTIONS, "Prediction", 30)
        if r["query_id"] in wanted
    ]
    late_ms = sorted((r["emitted_at_us"] - r["sent_at_us"]) / 1000 for r in ours)
    stats = {
        "queries": len(wanted),
        "defaults": sum(r["default"] for r in ours),
        "partial": sum(not r["default"] and len(r["models"]) < len(MODELS) for r in ours),
        "p50_ms": round(late_ms[len(late_ms) // 2]),
        "max_ms": round(late_ms[-1]),
    }
    print(f"\n{load.app}: {stats}")
    return stats


def register(settings: Settings, app: str) -> None:
    registry.register_app(
        settings,
        app,
        MODELS,
        policy="EXP4",
        personalised=True,
        deadline_ms=2000,
        default_label="0",
        eta=0.2,
        cache=False,
    )


def serving(settings: Settings, app: str) -> None:
    client, reader = Client(settings), PredictionReader(settings)
    try:
        wait_until_serving(client, reader, app, np.zeros(64).tolist(), timeout=120)
    finally:
        reader.close()


def progress(load: Load, more: int, timeout: float = 120) -> None:
    """Wait until ``more`` further queries have been answered."""
    target = load.answered() + more
    wait_for(lambda: load.answered() >= target, timeout, f"{more} more predictions", 0.2)


@pytest.mark.timeout(240)
def test_replica_killed(kafka_settings, processes):
    """(a) kill -9 one of two replicas of a model while queries flow."""
    app = "fault-replica"
    register(kafka_settings, app)
    processes("worker", "worker")
    doomed = processes("replica-a", "replica", "--model", MODELS[0])
    processes("replica-b", "replica", "--model", MODELS[0])
    processes("replica-weak", "replica", "--model", MODELS[1])
    serving(kafka_settings, app)
    with Load(kafka_settings, app) as load:
        progress(load, 200)
        doomed.kill()
        progress(load, 300)
        check_promise(kafka_settings, load)


@pytest.mark.timeout(300)
def test_worker_stopped_and_started_again(kafka_settings, processes):
    """(b) SIGTERM one of two workers, then start it again: partitions move both ways."""
    app = "fault-rebalance"
    register(kafka_settings, app)
    processes("worker-1", "worker")
    second = processes("worker-2", "worker")
    for model in MODELS:
        processes(f"replica-{model}", "replica", "--model", model)
    serving(kafka_settings, app)
    with Load(kafka_settings, app) as load:
        progress(load, 200)
        assert second.stop() == 0
        progress(load, 200)
        processes("worker-2-again", "worker")
        progress(load, 300)
        check_promise(kafka_settings, load)


@pytest.mark.timeout(300)
def test_only_worker_killed_and_restarted(kafka_settings, processes):
    """(c) kill -9 the only worker and start a new one: table recovery from the changelog,
    answered queries and their answers recovered from the predictions topic."""
    app = "fault-crash"
    register(kafka_settings, app)
    worker = processes("worker", "worker")
    for model in MODELS:
        processes(f"replica-{model}", "replica", "--model", model)
    serving(kafka_settings, app)
    with Load(kafka_settings, app) as load:
        progress(load, 200)
        load.hold_feedback.set()  # this feedback reaches only the next worker
        progress(load, 100)
        worker.kill()
        processes("worker-again", "worker")
        progress(load, 300, timeout=180)
        assert len(load.held) >= 100
        load.hold_feedback.clear()
        check_promise(kafka_settings, load)


@pytest.mark.timeout(300)
def test_scale_out_workers_and_replicas(kafka_settings, processes):
    """(e) workers 1 -> 2 and replicas 1 -> 3 while queries flow."""
    app = "fault-scale"
    register(kafka_settings, app)
    processes("worker-1", "worker")
    for model in MODELS:
        processes(f"replica-{model}", "replica", "--model", model)
    serving(kafka_settings, app)
    with Load(kafka_settings, app) as load:
        progress(load, 200)
        processes("worker-2", "worker")
        processes("replica-2", "replica", "--model", MODELS[0])
        processes("replica-3", "replica", "--model", MODELS[0])
        progress(load, 400)
        check_promise(kafka_settings, load)


@pytest.mark.timeout(300)
def test_broker_restarted(broker, kafka_settings, processes):
    """(d) restart the broker mid-stream (last: the other tests keep their broker)."""
    app = "fault-broker"
    register(kafka_settings, app)
    processes("worker", "worker")
    for model in MODELS:
        processes(f"replica-{model}", "replica", "--model", model)
    serving(kafka_settings, app)
    with Load(kafka_settings, app) as load:
        progress(load, 200)
        broker.restart()
        progress(load, 300, timeout=180)
        check_promise(kafka_settings, load)
