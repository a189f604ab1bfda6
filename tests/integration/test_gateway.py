"""The REST gateway with a real HTTP client against a running worker on the real broker:
predictions come back synchronously and are the same ones Kafka readers see, feedback
reaches the feedback topic, bad input gets 400/404 with a reason, and a query nobody
answers gets the app's default output at its deadline. The workers here run the explicitly
open gateway (CLIPSTREAM_GATEWAY_AUTH=open); tokens and HTTPS are in test_security.py.

Also the prediction readers (the gateway's, the SDK's PredictionReader and Predictor): a
malformed prediction is skipped, counted and dead-lettered while the rest of its batch is
served, and the gateway decodes only the predictions it waits for."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState, Producer
from confluent_kafka.admin import AdminClient

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.gateway.server import Gateway, PredictionWaiter
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader, Predictor
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.limits import MAX_DEADLINE_MS
from tests.conftest import wait_for
from tests.integration.helpers import collect, read_all, stop_children, wait_until_serving

pytestmark = pytest.mark.integration

APP = "digits-rest"
LONELY = "digits-lonely"  # its model has no replica: only defaults
MODEL = "digits-logreg"
ORPHAN = "digits-forest"


def http(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def deployed(kafka_settings: Settings, digits_models) -> Settings:
    registry.deploy_model(kafka_settings, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    registry.deploy_model(kafka_settings, ORPHAN, str(digits_models[ORPHAN][0]), input_dim=64)
    registry.register_app(
        kafka_settings, APP, [MODEL], deadline_ms=5000, default_label="0", input_dim=64
    )
    registry.register_app(kafka_settings, LONELY, [ORPHAN], deadline_ms=300, default_label="7")
    return kafka_settings


def test_gateway_answers_with_the_default_when_no_prediction_comes(deployed: Settings) -> None:
    # No worker runs yet: nothing will ever answer, so the gateway's own deadline fires.
    settings = Settings(**{**deployed.__dict__, "gateway_margin_ms": 200.0})
    gateway = Gateway(settings, registry.current(settings))
    try:
        status, body = asyncio.run(gateway.predict(LONELY, {"features": [0.0] * 64}))
    finally:
        gateway.close()
    assert status == 200
    assert body["default"] is True and body["label"] == "7"
    assert "deadline" in body["error"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="module")
def gateway_urls(deployed: Settings, logs: Path):
    """Two workers (so a REST call often reaches one that does not own its query's
    partition) and one replica; yields each worker's gateway URL once all serve."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": deployed.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(deployed.partitions),
        "CLIPSTREAM_GATEWAY_AUTH": "open",
    }
    ports = [free_port(), free_port()]
    children = [
        spawn(f"worker-{i}", clipstream_command("worker", "--web-port", str(p)), logs, env)
        for i, p in enumerate(ports)
    ]
    children.append(spawn("replica", clipstream_command("replica", "--model", MODEL), logs, env))
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:

            def listening(url: str = url) -> int:
                try:
                    return http("POST", f"{url}/apps/{APP}/predict", {"features": [0.0] * 64})[0]
                except OSError:  # the web server is not up yet
                    return 0

            wait_for(listening, 120, f"the REST gateway at {url} to listen")
        # Queries caught in the rebalance after the second worker joins may be re-read
        # after their deadline and answered with the default: the tests start after it.
        admin = AdminClient(deployed.kafka())

        def one_stable_group_of_two() -> bool:
            group_id = topics.SERVING_GROUP
            group = admin.describe_consumer_groups([group_id])[group_id].result(10)
            return group.state == ConsumerGroupState.STABLE and len(group.members) == 2

        wait_for(one_stable_group_of_two, 120, "both workers in one stable group")
        _, X_test, _, _ = digits_split()
        reader = PredictionReader(deployed)
        try:
            wait_until_serving(Client(deployed), reader, APP, X_test[0].tolist())
        finally:
            reader.close()
        yield urls
    finally:
        stop_children(children)


@pytest.fixture(scope="module")
def gateway_url(gateway_urls: list[str]) -> str:
    return gateway_urls[0]


def test_any_worker_answers_any_query(gateway_urls: list[str]) -> None:
    _, X_test, _, y_test = digits_split()
    answers = []
    for i in range(24):
        # users spread the keys over all partitions; the two workers own two each
        body = {"features": X_test[i].tolist(), "user": f"user-{i}"}
        status, prediction = http("POST", f"{gateway_urls[i % 2]}/apps/{APP}/predict", body)
        assert status == 200, prediction
        answers.append((prediction, str(y_test[i]), f"user-{i}"))
    assert all(not p["default"] and p["models"] == [f"{MODEL}@1"] for p, _, _ in answers), [
        (p["default"], p["error"], p["query_id"]) for p, _, _ in answers
    ]
    assert all(p["user"] == user for p, _, user in answers)  # each got its own query's answer
    assert sum(p["label"] == y for p, y, _ in answers) >= 21


def test_predict_over_rest_is_the_prediction_kafka_readers_see(
    deployed: Settings, gateway_url: str, digits_models
) -> None:
    reader = PredictionReader(deployed)
    _, X_test, _, y_test = digits_split()
    answers = {}
    for x, y in zip(X_test[:40], y_test[:40], strict=True):
        status, body = http("POST", f"{gateway_url}/apps/{APP}/predict", {"features": x.tolist()})
        assert status == 200, body
        answers[body["query_id"]] = (body, str(y))

    assert all(not b["default"] and b["error"] is None for b, _ in answers.values())
    assert all(b["models"] == [f"{MODEL}@1"] for b, _ in answers.values())
    accuracy = sum(b["label"] == y for b, y in answers.values()) / len(answers)
    assert accuracy >= 0.9, accuracy  # answering another query's prediction would fail this
    # the same predictions went to the topic, once each
    on_topic = collect(reader, set(answers), timeout=30)
    reader.close()
    assert set(on_topic) == set(answers)
    for qid, records in on_topic.items():
        assert len(records) == 1
        assert records[0]["label"] == answers[qid][0]["label"]

    # a caller-chosen query id and user travel with the query
    status, body = http(
        "POST",
        f"{gateway_url}/apps/{APP}/predict",
        {"features": X_test[1].tolist(), "query_id": "rest-q-1", "user": "alice"},
    )
    assert (status, body["query_id"], body["user"]) == (200, "rest-q-1", "alice")


def test_feedback_over_rest_reaches_the_feedback_topic(deployed: Settings, gateway_url: str):
    _, X_test, _, y_test = digits_split()
    status, body = http(
        "POST", f"{gateway_url}/apps/{APP}/predict", {"features": X_test[5].tolist()}
    )
    assert status == 200
    qid = body["query_id"]
    status, ack = http(
        "POST", f"{gateway_url}/apps/{APP}/feedback", {"query_id": qid, "label": int(y_test[5])}
    )
    assert (status, ack) == (202, {"query_id": qid, "accepted": True})

    def delivered() -> list[dict]:
        return [f for f in read_all(deployed, topics.FEEDBACK, "Feedback") if f["query_id"] == qid]

    (record,) = wait_for(delivered, 30, "the feedback record")
    assert record["app"] == APP and record["label"] == str(y_test[5])


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        (f"/apps/{APP}/predict", b"{not json", 400, "not valid JSON"),
        (f"/apps/{APP}/predict", b"[1, 2]", 400, "JSON object"),
        (f"/apps/{APP}/predict", b"{}", 400, "'features'"),
        (f"/apps/{APP}/predict", b'{"features": [1, 2, 3]}', 400, "expected 64 features"),
        (f"/apps/{APP}/predict", b'{"features": ["a"]}', 400, "'features[0]' must be a number"),
        (f"/apps/{APP}/predict", b'{"features": [1], "colour": 1}', 400, "unknown fields"),
        (f"/apps/{APP}/predict", b'{"features": [1], "user": null}', 400, "'user' must be"),
        (f"/apps/{APP}/predict", b'{"features": [1], "query_id": ""}', 400, "'query_id'"),
        ("/apps/no-such-app/predict", b'{"features": [1]}', 404, "unknown app"),
        (
            f"/apps/{LONELY}/predict",
            b'{"features": [1], "deadline_ms": %d}' % (MAX_DEADLINE_MS + 1),
            400,
            "'deadline_ms' must be at most 600000",
        ),
        (f"/apps/{APP}/feedback", b'{"query_id": "x"}', 400, "'label' or 'reward'"),
        (f"/apps/{APP}/feedback", b'{"query_id": "", "label": 1}', 400, "'query_id'"),
        (f"/apps/{APP}/feedback", b'{"query_id": "x", "reward": 3}', 400, "at most 1"),
        ("/apps/no-such-app/feedback", b'{"query_id": "x", "label": 1}', 404, "unknown app"),
    ],
)
def test_bad_requests_get_a_clear_reason(
    gateway_url: str, path: str, body: bytes, status: int, reason: str
) -> None:
    got, answer = http("POST", gateway_url + path, raw=body)
    assert got == status, answer
    assert reason in answer["error"]


def test_the_gateway_is_the_only_web_surface(gateway_url: str) -> None:
    # Faust's own pages (table contents, stats, router) are switched off; its "/" is a
    # bare health check
    assert http("GET", gateway_url + "/") == (200, {"status": "OK"})
    for path in ("/table/selection/", "/router/", "/graph/", "/stats/"):
        try:
            with urllib.request.urlopen(gateway_url + path, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status == 404, path


def test_a_query_nobody_serves_gets_the_default_over_rest(gateway_url: str) -> None:
    status, body = http("POST", f"{gateway_url}/apps/{LONELY}/predict", {"features": [0.0] * 64})
    assert status == 200
    assert body["default"] is True and body["label"] == "7"


def test_a_query_id_already_waiting_is_a_409_and_the_first_keeps_its_answer(
    gateway_url: str,
) -> None:
    body = {"features": [0.0] * 64, "query_id": "twice", "deadline_ms": 1500}
    url = f"{gateway_url}/apps/{LONELY}/predict"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(http, "POST", url, body)
        time.sleep(0.5)  # the first waits (nobody answers LONELY before its deadline)
        second = pool.submit(http, "POST", url, body)
        (status, answer), (conflict, refused) = first.result(), second.result()
    assert (status, answer["query_id"], answer["default"]) == (200, "twice", True)
    assert conflict == 409 and "'query_id' 'twice' is already waiting" in refused["error"]


def test_the_open_gateway_is_explicit_and_logged(gateway_urls: list[str], logs: Path) -> None:
    port = gateway_urls[0].rsplit(":", 1)[1]
    log = (logs / "worker-0.log").read_text()
    assert f"REST gateway on :{port} (http, open: no authentication)" in log
    assert "the REST gateway is OPEN (CLIPSTREAM_GATEWAY_AUTH=open)" in log


# -- the prediction readers ------------------------------------------------------------

GARBAGE = b"\xc3\x01not a prediction"


def prediction(qid: str, label: str = "3") -> bytes:
    return codec.encode(
        "Prediction",
        {
            "query_id": qid,
            "app": APP,
            "user": None,
            "label": label,
            "score": 0.9,
            "models": [f"{MODEL}@1"],
            "answers": [],
            "cache_hit": False,
            "default": False,
            "error": None,
            "sent_at_us": now_us(),
            "emitted_at_us": now_us(),
            "worker_us": 1,
        },
    )


def produce_predictions(settings: Settings, messages: list[tuple[bytes, bytes]]) -> list[int]:
    """Produce (key, value) pairs in order to predictions partition 0; their offsets."""
    producer = Producer(settings.kafka(**{"enable.idempotence": True}))
    offsets: list[int] = []
    for key, value in messages:
        producer.produce(
            topics.PREDICTIONS,
            value,
            key,
            partition=0,
            on_delivery=lambda err, msg: offsets.append(msg.offset() if err is None else -1),
        )
    assert producer.flush(30) == 0
    assert len(offsets) == len(messages) and -1 not in offsets
    return offsets


def dead_letters_for(settings: Settings, key: bytes) -> list[dict]:
    return [d for d in read_all(settings, topics.DEADLETTER, "DeadLetter") if d["key"] == key]


def test_a_malformed_prediction_is_skipped_and_dead_lettered_not_the_batch(
    deployed: Settings,
) -> None:
    reader = PredictionReader(deployed)
    try:
        offsets = produce_predictions(
            deployed,
            [
                (b"before-bad", prediction("before-bad")),
                (b"bad-1", GARBAGE),
                (b"after-bad", prediction("after-bad")),
            ],
        )
        got: dict[str, dict] = {}

        def served() -> bool:
            # before the fix the first poll raised here and dropped "after-bad"
            got.update((r["query_id"], r) for r in reader.poll(0.2))
            return {"before-bad", "after-bad"} <= set(got)

        wait_for(served, 30, "both good predictions around the malformed one")
        assert reader.malformed == 1
    finally:
        reader.close()  # also flushes the dead letter
    (dead,) = wait_for(lambda: dead_letters_for(deployed, b"bad-1"), 30, "the dead letter")
    assert dead["source_topic"] == topics.PREDICTIONS and dead["stage"] == "reader"
    assert (dead["partition"], dead["offset"]) == (0, offsets[1])
    assert dead["value"] == GARBAGE and dead["query_id"] == "bad-1"
    assert "not a valid Avro Prediction" in dead["reason"]


def test_the_predictor_keeps_serving_after_a_malformed_prediction(deployed: Settings) -> None:
    _, X_test, _, _ = digits_split()
    with Predictor(deployed) as predictor:
        # a query nobody can answer before its long deadline: only our prediction will come
        qid = "predictor-q"
        future = predictor.submit(
            LONELY, X_test[0].tolist(), query_id=qid, deadline_ms=MAX_DEADLINE_MS
        )
        produce_predictions(deployed, [(b"bad-2", GARBAGE), (qid.encode(), prediction(qid, "5"))])
        answer = future.result(30)
        assert (answer["query_id"], answer["label"]) == (qid, "5")
        assert predictor._thread.is_alive() and predictor.reader.malformed == 1


def test_the_gateway_decodes_only_the_predictions_it_waits_for(deployed: Settings) -> None:
    waiter = PredictionWaiter(deployed)

    async def wait_for_mine() -> dict:
        future = await waiter.expect("mine")
        produce_predictions(
            deployed,
            [
                (b"someone-else", GARBAGE),  # not waited for: never decoded, so not counted
                (b"someone-else-2", prediction("someone-else-2")),
                (b"mine", GARBAGE),  # waited for: decoded, dead-lettered, skipped
                (b"mine", prediction("mine", "8")),
            ],
        )
        return await asyncio.wait_for(future, 30)

    try:
        answer = asyncio.run(wait_for_mine())
        assert (answer["query_id"], answer["label"]) == ("mine", "8")
        # the records before "mine" in the partition were read first: only one was decoded
        assert waiter.reader.malformed == 1
        assert not waiter.reader.seen.first_time("mine")
        assert waiter.reader.seen.first_time("someone-else-2")  # never decoded
    finally:
        waiter.close()


def test_an_idle_gateway_stops_reading_and_resumes_for_the_next_request(deployed: Settings) -> None:
    waiter = PredictionWaiter(deployed)
    waiter.IDLE_S = 0.2
    try:
        wait_for(lambda: not waiter._active.is_set(), 10, "the idle reader to pause")
        # produced while nobody waits: never read (the reader goes on from the end)
        produce_predictions(deployed, [(b"while-idle", prediction("while-idle"))])

        async def next_request() -> dict:
            future = await waiter.expect("after-idle")
            assert waiter._active.is_set()  # reading again before the query goes out
            produce_predictions(deployed, [(b"after-idle", prediction("after-idle", "4"))])
            return await asyncio.wait_for(future, 30)

        answer = asyncio.run(next_request())
        assert (answer["query_id"], answer["label"]) == ("after-idle", "4")
        assert waiter.reader.seen.first_time("while-idle")  # skipped, never decoded
    finally:
        waiter.close()
