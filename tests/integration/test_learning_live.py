"""Learning over a real broker, with Faust's per-event stream and with the bulk path that
overrides Faust's consumer loop (streams/faust_bulk.py): the same feedback gives the same
state, bit for bit, which is also what replay computes; and every worker reads it."""

from __future__ import annotations

import json

import pytest

from models import registry
from models.training import digits_split
from selection import SelectionState
from streams import topics
from streams.replay import replay
from streams.sdk import Client, PredictionReader
from tests.conftest import wait_for
from tests.integration.helpers import (
    collect,
    learnt_everything,
    stored_states,
    wait_until_serving,
)

pytestmark = pytest.mark.integration

MODELS = ["digits-logreg", "digits-weak"]


@pytest.fixture(scope="module")
def deployed(kafka_settings, digits_models):
    for name in MODELS:
        registry.deploy_model(kafka_settings, name, str(digits_models[name][0]), input_dim=64)
    return kafka_settings


@pytest.mark.parametrize("bulk", ["1", "0"])
def test_feedback_folds_to_the_replayed_state_with_and_without_the_bulk_path(
    deployed, processes, bulk
):
    app = f"learn-bulk-{bulk}"
    registry.register_app(
        deployed, app, MODELS, policy="EXP4", deadline_ms=3000, default_label="0", eta=0.2
    )
    worker = processes(f"worker-{bulk}", "worker", env={"CLIPSTREAM_BULK_LEARN": bulk})
    for model in MODELS:
        processes(f"replica-{model}-{bulk}", "replica", "--model", model)
    client, reader = Client(deployed), PredictionReader(deployed)
    _, X, _, y = digits_split()
    wait_until_serving(client, reader, app, X[0].tolist())
    truth = {client.send_query(app, X[i].tolist(), user=f"u{i % 5}"): str(y[i]) for i in range(150)}
    client.flush()
    got = collect(reader, set(truth), 60)
    assert set(got) == set(truth)
    for qid, label in truth.items():
        client.send_feedback(qid, app, label=label)
    client.flush()
    wait_for(lambda: learnt_everything(deployed), 60, "every feedback folded")
    replayed, counts = replay(deployed, app, dry_run=True)
    assert counts["applied"] == 150
    expected = replayed[app].to_state()

    def stored() -> dict | None:
        return stored_states(deployed, app)[0].get(app)

    wait_for(lambda: stored() == expected, 30, "the stored state to equal the replay")
    weights = SelectionState.from_state(expected).weights()
    assert weights["digits-logreg"] > 0.9 > weights["digits-weak"]
    assert json.dumps(stored()) == json.dumps(expected)  # bit for bit
    # one writer: the key's state was written to its observations' partition, only
    _, written = stored_states(deployed, app)
    assert written == {app: {topics.partition_for(app, deployed.partitions)}}
    assert worker.alive()
