"""The Faust integration against a real broker, a live worker and replicas: a real Faust
worker (aiokafka driver, tests/integration/faust_enricher.py in a subprocess) enriches each
of its events with a prediction awaited through ``Clipstream.predict``, writes the enriched
events to its output topic and sends feedback, through the SDK and as Faust records;
queries it sends as ``Query`` records through Faust's producer are answered, and read back
by an agent on clipstream.predictions. Every event is answered exactly once, correctly for
digits, each query lands on the partition the SDK gives its id, and the feedback reaches
the users' selection states."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.runtime.processes import clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.partitioner import partition
from tests.conftest import wait_for
from tests.integration.helpers import (
    learnt_everything,
    read_to_end,
    stop_children,
    stored_states,
    wait_until_serving,
)

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
APP = "faust-digits"  # Exp4 over two models, a state per user (and the app's own)
MODELS = ["digits-logreg", "digits-forest"]
USERS = [f"user-{i}" for i in range(4)]
EVENTS, ENRICHED, DIRECT = "faust-test-events", "faust-test-enriched", "faust-test-direct"
N_EVENTS, N_DIRECT = 240, 40
DOCS = ROOT / "docs" / "operations.md"
DOCS_APP = "digits"  # what the docs' example asks
DOCS_TOPICS = ("orders", "orders-scored")


@pytest.fixture(scope="module")
def serving(kafka_settings: Settings, digits_models, tmp_path_factory: pytest.TempPathFactory):
    """The apps deployed, the Faust apps' own topics created, one worker and a replica of
    each of MODELS serving."""
    settings = kafka_settings
    for name in MODELS:
        registry.deploy_model(settings, name, str(digits_models[name][0]), input_dim=64)
    registry.register_app(
        settings,
        APP,
        MODELS,
        policy="EXP4",
        personalised=True,
        deadline_ms=5000,
        default_label="0",
        input_dim=64,
        cache=False,
    )
    registry.register_app(
        settings, DOCS_APP, MODELS[:1], deadline_ms=5000, default_label="0", input_dim=64
    )
    plan = topics.TopicPlan(settings.partitions)
    admin = AdminClient(settings.kafka())
    ours = (EVENTS, ENRICHED, DIRECT, *DOCS_TOPICS)
    topics.ensure_topics(admin, [plan.topic(name, 4) for name in ours])
    logs = tmp_path_factory.mktemp("faust-logs")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(settings.partitions),
    }
    worker = clipstream_command("worker", "--web-port", "0", "--metrics-port", "0")
    children = [spawn("worker", worker, logs, env)]
    for m in MODELS:
        replica = clipstream_command("replica", "--model", m, "--metrics-port", "0")
        children.append(spawn(f"replica-{m}", replica, logs, env))
    try:
        _, X_test, _, _ = digits_split()
        client, reader = Client(settings), PredictionReader(settings)
        try:
            for app in (APP, DOCS_APP):
                wait_until_serving(client, reader, app, X_test[0].tolist())
        finally:
            reader.close()
        yield settings
    finally:
        stop_children(children)


def test_a_faust_agent_enriches_its_events_with_predictions(
    serving: Settings, tmp_path: Path
) -> None:
    settings = serving
    _, X_test, _, y_test = digits_split()
    faust_worker = spawn(
        "faust-enricher",
        [sys.executable, str(HERE / "faust_enricher.py"), "worker", "--without-web", "-l", "info"],
        tmp_path / "logs",
        {
            "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
            "PYTHONPATH": str(ROOT),
            "FAUST_TEST_CLIPSTREAM_APP": APP,
            "FAUST_TEST_EVENTS": EVENTS,
            "FAUST_TEST_ENRICHED": ENRICHED,
            "FAUST_TEST_DIRECT": DIRECT,
            "FAUST_TEST_DATADIR": str(tmp_path / "faust-data"),
        },
    )
    try:
        # events: a third without a user, the rest spread over USERS; the last N_DIRECT are
        # sent by the app as Query records through Faust's producer
        events = [
            {
                "id": str(i),
                "features": X_test[i].tolist(),
                "truth": str(y_test[i]),
                "user": None if i % 3 == 0 else USERS[i % len(USERS)],
                "direct": i >= N_EVENTS,
            }
            for i in range(N_EVENTS + N_DIRECT)
        ]
        producer = Producer(settings.kafka(**{"linger.ms": 5}))
        for event in events:
            producer.produce(EVENTS, json.dumps(event).encode(), event["id"].encode())
        assert producer.flush(30) == 0

        def read(topic: str) -> list:
            return read_to_end(settings, topic, timeout=30)

        def all_enriched() -> bool:
            assert faust_worker.alive(), faust_worker.log_tail(60)
            return len(read(ENRICHED)) >= N_EVENTS and len(read(DIRECT)) >= N_DIRECT

        wait_for(all_enriched, 180, "the Faust agent's enriched events", interval=1.0)
        time.sleep(2)  # a duplicate, if any were coming, would be on the topics by now
        enriched = [json.loads(m.value()) for m in read(ENRICHED)]
        direct = [(m.key().decode(), codec.decode("Prediction", m.value())) for m in read(DIRECT)]
        queries = read(topics.QUERIES)
        predictions = [codec.decode("Prediction", m.value()) for m in read(topics.PREDICTIONS)]
    except BaseException:
        print(f"--- faust-enricher ---\n{faust_worker.log_tail(80)}")
        raise
    finally:
        code = faust_worker.stop()
    assert code in (0, -15), faust_worker.log_tail(80)

    # every event answered exactly once: on the output topic and on clipstream.predictions
    by_id = {e["id"]: e for e in events}
    assert sorted(Counter(e["id"] for e in enriched).items()) == sorted(
        (str(i), 1) for i in range(N_EVENTS)
    )
    answered = Counter(p["query_id"] for p in predictions)
    for i in range(N_EVENTS):
        assert answered[f"faust-{i}"] == 1, i
    for i in range(N_EVENTS, N_EVENTS + N_DIRECT):
        assert answered[f"faust-direct-{i}"] == 1, i
    for e in enriched:
        assert (e["query_id"], e["user"]) == (f"faust-{e['id']}", by_id[e["id"]]["user"])
        assert not e["default"] and sorted(e["models"]) == [f"{m}@1" for m in sorted(MODELS)]
    right = Counter(e["label"] == e["truth"] for e in enriched)
    assert right[True] / len(enriched) > 0.9, right

    # the direct queries: read back by Faust as Prediction records, keyed by their id
    assert sorted(key for key, _ in direct) == sorted(
        f"faust-direct-{i}" for i in range(N_EVENTS, N_EVENTS + N_DIRECT)
    )
    direct_right = Counter(
        p["label"] == by_id[key.removeprefix("faust-direct-")]["truth"] for key, p in direct
    )
    assert all(key == p["query_id"] and not p["default"] for key, p in direct)
    assert direct_right[True] / N_DIRECT > 0.9, direct_right

    # each query, Faust's producer's or the SDK's, on the partition the SDK gives its id
    ours = [m for m in queries if m.key() and m.key().decode().startswith("faust-")]
    assert len(ours) == N_EVENTS + N_DIRECT
    for m in ours:
        assert m.partition() == partition(m.key(), settings.partitions), m.key()
    feedback = [m for m in read_to_end(settings, topics.FEEDBACK, 30) if m.key()]
    feedback = [m for m in feedback if m.key().decode().startswith("faust-")]
    assert len(feedback) == N_EVENTS  # half through the SDK, half as Faust records
    assert {codec.decode("Feedback", m.value())["query_id"] for m in feedback} == {
        f"faust-{i}" for i in range(N_EVENTS)
    }
    for m in feedback:
        assert m.partition() == partition(m.key(), settings.partitions)

    # the feedback applied: each record folded once into its key's state
    keys = Counter(APP if not e["user"] else f"{APP}|{e['user']}" for e in events[:N_EVENTS])
    wait_for(lambda: learnt_everything(settings), 90, "the feedback joined and folded")

    def folded() -> dict[str, int]:
        states, _ = stored_states(settings, APP)
        return {key: state.get("updates", 0) for key, state in states.items()}

    wait_for(lambda: folded() == dict(keys), 90, f"the feedback folded into {dict(keys)}")


def docs_example() -> str:
    found = re.search(r"```python\n(import os\n\nimport faust\n.*?)```", DOCS.read_text(), re.S)
    assert found is not None, "the Faust example of docs/operations.md went missing"
    return found.group(1)


def test_the_docs_faust_example_runs_as_written(serving: Settings, tmp_path: Path) -> None:
    settings = serving
    (tmp_path / "orders.py").write_text(docs_example())
    # `python orders.py worker`, in tmp_path (Faust keeps its data directory in the cwd)
    run = (
        f"import os, runpy; os.chdir({str(tmp_path)!r}); "
        "runpy.run_path('orders.py', run_name='__main__')"
    )
    faust_worker = spawn(
        "faust-orders",
        [sys.executable, "-c", run, "worker", "--without-web", "-l", "info"],
        tmp_path / "logs",
        {"KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap()},
    )
    _, X_test, _, y_test = digits_split()
    n = 60
    try:
        producer = Producer(settings.kafka(**{"linger.ms": 5}))
        for i in range(n):
            order = {"id": str(i), "features": X_test[i].tolist(), "user": f"u{i % 3}"}
            producer.produce("orders", json.dumps(order).encode(), str(i).encode())
        assert producer.flush(30) == 0

        def scored() -> list:
            assert faust_worker.alive(), faust_worker.log_tail(60)
            return [json.loads(m.value()) for m in read_to_end(settings, "orders-scored", 30)]

        wait_for(lambda: len(scored()) >= n, 180, "the docs' agent's scored orders", interval=1.0)
        got = scored()
    except BaseException:
        print(f"--- faust-orders ---\n{faust_worker.log_tail(80)}")
        raise
    finally:
        code = faust_worker.stop()
    assert code in (0, -15), faust_worker.log_tail(80)
    assert sorted(int(o["id"]) for o in got) == list(range(n))
    right = Counter(o["label"] == str(y_test[int(o["id"])]) for o in got)
    assert right[True] / n > 0.9, right
