"""Learning over a real broker, on one worker and on two: feedback of queries with and
without a user, answered by either worker, folds into each selection key's state on the
key's one writer, bit for bit what replay computes from the observations log."""

from __future__ import annotations

import json
import time

import pytest

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.selection import SelectionState
from clipstream.streams.learning.replay import replay
from clipstream.streams.ops.status import scrape
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import topics
from tests.conftest import wait_for
from tests.integration.helpers import (
    collect,
    learnt_everything,
    read_to_end,
    stored_states,
    wait_until_serving,
    workers_serving,
)

pytestmark = pytest.mark.integration

MODELS = ["digits-logreg", "digits-weak"]


@pytest.fixture(scope="module")
def deployed(kafka_settings, digits_models):
    for name in MODELS:
        registry.deploy_model(kafka_settings, name, str(digits_models[name][0]), input_dim=64)
    return kafka_settings


def register_personalised_exp4(settings, app: str, eta: float) -> None:
    registry.register_app(
        settings,
        app,
        MODELS,
        policy="EXP4",
        deadline_ms=3000,
        default_label="0",
        eta=eta,
        personalised=True,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_feedback_folds_to_the_replayed_states_on_one_worker_and_on_two(
    deployed, processes, workers
):
    app = f"learn-{workers}"
    register_personalised_exp4(deployed, app, eta=0.2)
    started = [processes(f"worker-{workers}-{i}", "worker") for i in range(workers)]
    for model in MODELS:
        processes(f"replica-{model}-{workers}", "replica", "--model", model)
    client, reader = Client(deployed), PredictionReader(deployed)
    _, X, _, y = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())
    # queries of four users and queries without one (those learn into the app's own state)
    users = ["u0", "u1", "u2", "u3", None]
    truth = {
        client.send_query(app, X[i].tolist(), user=users[i % 5]): str(y[i]) for i in range(200)
    }
    client.flush()
    got = collect(reader, set(truth), 60)
    assert set(got) == set(truth)
    for qid, label in truth.items():
        client.send_feedback(qid, app, label=label)
    client.flush()
    wait_for(lambda: learnt_everything(deployed), 60, "every feedback folded")
    replayed, counts = replay(deployed, app, dry_run=True)
    assert counts["applied"] == 200
    keys = {app, *(f"{app}|{u}" for u in users if u)}
    assert set(replayed) == keys
    expected = {key: state.to_state() for key, state in replayed.items()}

    def stored() -> dict[str, dict]:
        return stored_states(deployed, app)[0]

    wait_for(lambda: stored() == expected, 30, "the stored states to equal the replay")
    # bit for bit: the same floats, not close ones
    assert json.dumps(stored(), sort_keys=True) == json.dumps(expected, sort_keys=True)
    weights = SelectionState.from_state(expected[f"{app}|u0"]).weights()
    assert weights["digits-logreg"] > weights["digits-weak"]
    # one writer per key: each key's state was written to its observations' partition only
    _, written = stored_states(deployed, app)
    assert written == {key: {topics.partition_for(key, deployed.partitions)} for key in keys}
    assert all(worker.alive() for worker in started)


def test_feedback_at_a_steady_rate_is_learnt_in_batches(deployed, processes):
    """Feedback every 20 ms for one selection key, on a worker whose learning feed gathers
    for a second: the key's state is written once per batch (it was once per 50 ms, or per
    record, before), still bit for bit what replay computes."""
    app = "learn-batched"
    registry.register_app(
        deployed, app, MODELS, policy="EXP3", deadline_ms=3000, default_label="0", eta=0.2
    )
    port = free_port()
    processes(
        "worker-batched",
        "worker",
        "--metrics-port",
        str(port),
        env={"CLIPSTREAM_LEARN_BATCH_MS": "1000"},
    )
    for model in MODELS:
        processes(f"replica-{model}-batched", "replica", "--model", model)
    client, reader = Client(deployed), PredictionReader(deployed)
    _, X, _, y = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())
    truth = {client.send_query(app, X[i].tolist()): str(y[i]) for i in range(100)}
    client.flush()
    assert set(collect(reader, set(truth), 60)) == set(truth)

    def writes() -> int:
        return sum(
            1
            for msg in read_to_end(deployed, topics.SELECTION_CHANGELOG, timeout=30)
            if msg.key() == app.encode()
        )

    # one record first: once it is folded, the feed reads every partition involved
    (first, label), *rest = truth.items()
    client.send_feedback(first, app, label=label)
    client.flush()
    wait_for(lambda: learnt_everything(deployed) and writes() == 1, 60, "the first folded")
    started = time.monotonic()
    for qid, label in rest:
        client.send_feedback(qid, app, label=label)
        client.flush()
        time.sleep(0.02)  # the steady rate under test, not a wait for anything
    spread_s = time.monotonic() - started
    wait_for(lambda: learnt_everything(deployed), 60, "every feedback folded")
    replayed, counts = replay(deployed, app, dry_run=True)
    assert counts["applied"] == 100
    expected = replayed[app].to_state()
    wait_for(lambda: stored_states(deployed, app)[0].get(app) == expected, 30, "the replay")
    # a batch a second of feedback, and one more where a batch's observations come in two
    # fetches: about 2.5 s of feedback makes a handful, where one per 50 ms made 40 or
    # more (and the serving loop's idle turns, 100 ms apart, about 25)
    batched = writes() - 1
    assert 1 <= batched <= 2 * (spread_s / 1.0 + 1), (batched, spread_s)

    # the key's one writer does not read its own states back from the changelog (every
    # partition is this worker's): it read none of the states it wrote
    read_back = scrape(f"http://127.0.0.1:{port}/metrics")
    assert read_back[("clipstream_selection_state_staleness_seconds_count", ())] == 0


def test_a_former_writer_reads_what_its_successor_writes(deployed, processes):
    """A key's writer does not read its changelog partition back; when a worker joins and
    the partition gets another writer, the former one reads it again from after its own
    last write. So every worker answers with the weights the key's latest writer wrote."""
    app = "learn-handover"
    register_personalised_exp4(deployed, app, eta=0.5)
    processes("worker-handover-0", "worker")
    processes("worker-handover-1", "worker")
    for model in MODELS:
        processes(f"replica-{model}-handover", "replica", "--model", model)
    client, reader = Client(deployed), PredictionReader(deployed)
    _, X, _, y = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())
    # sixteen users: their keys are on every partition, so whichever partitions move in the
    # rebalance below, some keys get a new writer
    users = [f"u{i}" for i in range(16)]

    def ask(first: int) -> dict[str, tuple[str, list[dict]]]:
        """160 queries of the users, each answered by the worker holding its partition:
        query id -> (its user, its answers), in the order sent."""
        user_of = {
            client.send_query(app, X[i].tolist(), user=users[i % 16]): users[i % 16]
            for i in range(first, first + 160)
        }
        client.flush()
        got = collect(reader, set(user_of), 60)
        assert set(got) == set(user_of)
        return {qid: (user, got[qid][0]["answers"]) for qid, user in user_of.items()}

    def learn(first: int) -> None:
        for i, qid in enumerate(ask(first), start=first):
            client.send_feedback(qid, app, label=str(y[i]))
        client.flush()
        wait_for(lambda: learnt_everything(deployed), 60, "every feedback folded")

    learn(0)
    processes("worker-handover-2", "worker")
    workers_serving(deployed, 3)
    learn(160)
    replayed, counts = replay(deployed, app, dry_run=True)
    assert counts["applied"] == 320
    expected = {key: state.to_state() for key, state in replayed.items()}
    wait_for(lambda: stored_states(deployed, app)[0] == expected, 30, "the replayed states")
    latest = {key: state.weights() for key, state in replayed.items()}

    def answered_with_the_latest_weights() -> bool:
        return all(
            answer["prob"] == pytest.approx(latest[f"{app}|{user}"][answer["model"]], abs=1e-12)
            for user, answers in ask(320).values()
            for answer in answers
        )

    wait_for(answered_with_the_latest_weights, 30, "every worker to use the latest weights")
