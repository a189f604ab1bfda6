"""The asyncio SDK (AsyncPredictor, AsyncClient) against a real broker, a live worker and
replicas: hundreds of concurrent awaits from one event loop, each answered once with its
own query's prediction (with and without a user, a personalised Exp4 ensemble over two
models), feedback that reaches the users' selection states, the app's default when no
model answers by the deadline, and a query that gets no answer at all forgotten, by the
async and the sync Predictor alike. The README's asyncio block runs here as written."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.runtime.processes import clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader, Predictor
from clipstream.streams.sdk_async import AsyncClient, AsyncPredictor
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.limits import MAX_DEADLINE_MS
from tests.conftest import wait_for
from tests.integration.helpers import collect, stop_children, stored_states, wait_until_serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = "async-digits"  # one model
ENSEMBLE = "async-ensemble"  # Exp4 over two models, a state per user
LONELY = "async-lonely"  # its model has no replica: only the default, at the deadline
README_APP = "digits"  # the app the README's block names
MODELS = ["digits-logreg", "digits-forest"]
ORPHAN = "digits-tree"
USERS = [f"user-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def deployed(kafka_settings: Settings, digits_models) -> Settings:
    for name in [*MODELS, ORPHAN]:
        registry.deploy_model(kafka_settings, name, str(digits_models[name][0]), input_dim=64)
    for app in (APP, README_APP):
        registry.register_app(
            kafka_settings, app, MODELS[:1], deadline_ms=5000, default_label="0", input_dim=64
        )
    registry.register_app(
        kafka_settings,
        ENSEMBLE,
        MODELS,
        policy="EXP4",
        personalised=True,
        deadline_ms=5000,
        default_label="0",
        input_dim=64,
        cache=False,
    )
    registry.register_app(kafka_settings, LONELY, [ORPHAN], deadline_ms=300, default_label="7")
    return kafka_settings


@pytest.fixture(scope="module")
def serving(deployed: Settings, tmp_path_factory: pytest.TempPathFactory):
    """One worker and a replica of each of MODELS (none of ORPHAN), serving every app."""
    logs = tmp_path_factory.mktemp("async-sdk-logs")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": deployed.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(deployed.partitions),
    }
    worker = clipstream_command("worker", "--web-port", "0", "--metrics-port", "0")
    children = [spawn("worker", worker, logs, env)]
    for m in MODELS:
        replica = clipstream_command("replica", "--model", m, "--metrics-port", "0")
        children.append(spawn(f"replica-{m}", replica, logs, env))
    try:
        _, X_test, _, _ = digits_split()
        client, reader = Client(deployed), PredictionReader(deployed)
        try:
            for app in (APP, ENSEMBLE):
                wait_until_serving(client, reader, app, X_test[0].tolist())
        finally:
            reader.close()
        yield deployed
    finally:
        stop_children(children)


def test_hundreds_of_concurrent_awaits_are_each_answered_once_with_their_own_prediction(
    serving: Settings,
) -> None:
    _, X_test, _, y_test = digits_split()
    # (query id, app, user, truth): a third to the one-model app without a user, a third
    # with one, a third to the personalised ensemble
    plan = [
        (
            f"async-{i}",
            ENSEMBLE if i % 3 == 2 else APP,
            None if i % 3 == 0 else USERS[i % len(USERS)],
            str(y),
        )
        for i, y in enumerate(y_test)
    ]
    raw = PredictionReader(serving)  # sees every prediction on the topic, duplicates too

    async def main() -> tuple[list[dict], list[str], int]:
        async with AsyncPredictor(serving) as predictor:
            answers = await asyncio.gather(
                *(
                    predictor.predict(app, x.tolist(), query_id=qid, user=user, timeout=60)
                    for (qid, app, user, _), x in zip(plan, X_test, strict=True)
                )
            )
            # feedback for the ensemble's queries, through the async client
            for qid, app, user, truth in plan:
                if app == ENSEMBLE:
                    await predictor.client.send_feedback(qid, app, label=truth, user=user)
            await predictor.client.flush()
            waiting = predictor.waiting
        # fire-and-forget from a standalone AsyncClient
        client = AsyncClient(serving)
        sent = [await client.send_query(APP, x.tolist(), deadline_ms=20_000) for x in X_test[:20]]
        await client.flush()
        return answers, sent, waiting

    try:
        answers, sent, waiting = asyncio.run(main())
        on_topic = collect(raw, {qid for qid, *_ in plan} | set(sent), 30)
    finally:
        raw.close()
    assert len(set(sent)) == 20 and all(len(on_topic.get(q, [])) == 1 for q in sent)
    assert len(answers) == len(plan) > 500
    assert waiting == 0
    for (qid, app, user, _), answer in zip(plan, answers, strict=True):
        assert (answer["query_id"], answer["app"], answer["user"]) == (qid, app, user)
        assert not answer["default"] and answer["error"] is None, answer
        models = [f"{m}@1" for m in (MODELS if app == ENSEMBLE else MODELS[:1])]
        assert sorted(answer["models"]) == sorted(models), answer
    assert all(len(on_topic[qid]) == 1 for qid, *_ in plan)  # and no second one came
    # an answer handed to the wrong await would be a random digit: ~10% right
    right = Counter(
        answer["label"] == truth for (*_, truth), answer in zip(plan, answers, strict=True)
    )
    assert right[True] / len(plan) > 0.9, right

    # the feedback reached each user's own state of the ensemble, each record once
    users = Counter(user for _, app, user, _ in plan if app == ENSEMBLE)

    def folded() -> dict[str, int]:
        states, _ = stored_states(serving, ENSEMBLE)
        return {key: state.get("updates", 0) for key, state in states.items()}

    expected = {f"{ENSEMBLE}|{user}": n for user, n in users.items()}
    wait_for(lambda: folded() == expected, 90, f"the feedback folded into {expected}")


def test_no_model_answer_by_the_deadline_gives_the_apps_default(serving: Settings) -> None:
    async def main() -> tuple[list[dict], int]:
        async with AsyncPredictor(serving) as predictor:
            answers = await asyncio.gather(
                *(predictor.predict(LONELY, [0.0] * 64, timeout=30) for _ in range(20))
            )
            return answers, predictor.waiting

    answers, waiting = asyncio.run(main())
    assert waiting == 0
    assert len({a["query_id"] for a in answers}) == 20
    assert all(a["default"] and a["label"] == "7" for a in answers), answers


def test_a_query_without_an_answer_times_out_and_is_forgotten(serving: Settings) -> None:
    # The worker holds these until their long deadline: no answer comes within the timeout.
    async def main() -> tuple[int, int, int, dict]:
        async with AsyncPredictor(serving) as predictor:
            results = await asyncio.gather(
                *(
                    predictor.predict(LONELY, [0.0] * 64, timeout=0.5, deadline_ms=MAX_DEADLINE_MS)
                    for _ in range(10)
                ),
                return_exceptions=True,
            )
            timed_out = sum(isinstance(r, TimeoutError) for r in results)
            after_timeouts = predictor.waiting
            # a cancelled await forgets its query too
            task = asyncio.create_task(
                predictor.predict(LONELY, [0.0] * 64, timeout=None, deadline_ms=MAX_DEADLINE_MS)
            )
            await asyncio.to_thread(wait_for, lambda: predictor.waiting == 1, 10, "the query")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after_cancel = predictor.waiting
            # and the predictor serves on
            answer = await predictor.predict(APP, [0.0] * 64, timeout=30)
            return timed_out, after_timeouts, after_cancel, answer

    timed_out, after_timeouts, after_cancel, answer = asyncio.run(main())
    assert (timed_out, after_timeouts, after_cancel) == (10, 0, 0)
    assert not answer["default"]

    with Predictor(serving) as predictor:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                predictor.predict(LONELY, [0.0] * 64, timeout=0.5, deadline_ms=MAX_DEADLINE_MS)
        assert predictor.waiting == 0
        future = predictor.submit(LONELY, [0.0] * 64, deadline_ms=MAX_DEADLINE_MS)
        assert predictor.waiting == 1
        assert future.cancel()
        assert predictor.waiting == 0
        assert not predictor.predict(APP, [0.0] * 64, timeout=30)["default"]
        with pytest.raises(ValueError, match="already waiting"):
            predictor.submit(LONELY, [0.0] * 64, query_id="twice", deadline_ms=MAX_DEADLINE_MS)
            predictor.submit(LONELY, [0.0] * 64, query_id="twice", deadline_ms=MAX_DEADLINE_MS)


def readme_block() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```python\n(import asyncio\n.*?)```", readme, re.S)
    assert found is not None, "the README's asyncio block went missing"
    return found.group(1)


def test_the_readme_asyncio_block_runs_as_written(
    serving: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", serving.require_bootstrap())
    monkeypatch.setenv("CLIPSTREAM_PARTITIONS", str(serving.partitions))
    _, X_test, _, _ = digits_split()
    exec(compile(readme_block(), "README.md", "exec"), {"features": X_test[0].tolist()})
    printed = capsys.readouterr().out
    assert re.search(r"^100 answers, 0 defaults$", printed, re.M), printed
