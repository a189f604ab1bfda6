"""Clipper's REST API on a live worker over the real broker, with a client written from
Clipper's documented shapes: ``/{app}/predict`` (one input, a batch of one, a batch of
many), a label that parses as JSON embedded as its value, the default with Clipper's
explanation, ``/{app}/update`` joined to the right query, ``/metrics`` as JSON, and bad
bodies answered 400 with ``error`` and ``cause``. The README's Clipper example client runs
here as written; the same bearer-token auth as the gateway, and 1337 taken, are checked
in-process."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from clipstream.models.control import registry
from clipstream.models.files import load_model
from clipstream.models.training import digits_split, train_wide_model, wide_dataset
from clipstream.streams.gateway import clipper
from clipstream.streams.gateway.auth import make_entry, new_token
from clipstream.streams.gateway.server import Gateway
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import read_all, stop_children, wait_until_serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = "digits-clipper"
LONELY = "clipper-lonely"  # its model has no replica: only defaults
README_APP = "simple-example"  # the app Clipper's example client (and the README) names
MODEL = "digits-logreg"
ORPHAN = "digits-forest"
WIDE = "simple-model"
LISTENING = re.compile(r"Clipper REST frontend on :(\d+)")


def http(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wide_model(tmp_path_factory.mktemp("wide"), dim=200)[0]


@pytest.fixture(scope="module")
def deployed(kafka_settings: Settings, digits_models, wide_path: Path) -> Settings:
    registry.deploy_model(kafka_settings, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    registry.deploy_model(kafka_settings, ORPHAN, str(digits_models[ORPHAN][0]), input_dim=64)
    registry.deploy_model(kafka_settings, WIDE, str(wide_path), input_dim=200)
    registry.register_app(
        kafka_settings, APP, [MODEL], deadline_ms=5000, default_label="0", input_dim=64
    )
    registry.register_app(
        kafka_settings, README_APP, [WIDE], deadline_ms=5000, default_label="0", input_dim=200
    )
    registry.register_app(
        kafka_settings, LONELY, [ORPHAN], deadline_ms=300, default_label='{"digit": 7}'
    )
    return kafka_settings


@pytest.fixture(scope="module")
def worker(deployed: Settings, tmp_path_factory: pytest.TempPathFactory):
    """One worker (Clipper's 1337 where free, else a free port) and a replica per served
    model; yields the worker and its Clipper frontend's URL once both apps serve."""
    logs = tmp_path_factory.mktemp("clipper-logs")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": deployed.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(deployed.partitions),
        "CLIPSTREAM_GATEWAY_AUTH": "open",
    }
    children = [
        spawn(model, clipstream_command("replica", "--model", model), logs, env)
        for model in (MODEL, WIDE)
    ]
    try:
        # Clipper's 1337 where free; if another worker on this host takes it first, the
        # worker says so in one line and goes on: then one on a free port serves the tests
        port = None
        for clipper_port in ("1337", "0"):
            if clipper_port == "1337" and not port_is_free(clipper.DEFAULT_PORT):
                continue
            child = spawn(
                f"worker-{clipper_port}",
                clipstream_command("worker", "--web-port", str(free_port())),
                logs,
                {**env, "CLIPSTREAM_CLIPPER_PORT": clipper_port},
            )
            children.append(child)

            def listening(child: Child = child) -> tuple[int | None] | None:
                log = child.log_path.read_text(errors="replace")
                assert child.alive(), child.log_tail()
                if "Clipper REST frontend not started: port 1337 is taken" in log:
                    return (None,)
                found = LISTENING.search(log)
                return (int(found.group(1)),) if found else None

            (port,) = wait_for(listening, 120, "the Clipper frontend to listen or say why not")
            if port is not None:
                break
            child.stop()
        assert port is not None
        client, reader = Client(deployed), PredictionReader(deployed)
        try:
            _, X_test, _, _ = digits_split()
            wait_until_serving(client, reader, APP, X_test[0].tolist())
            wait_until_serving(client, reader, README_APP, [0.5] * 200)
        finally:
            reader.close()
        yield child, f"http://127.0.0.1:{port}"
    finally:
        stop_children(children)


@pytest.fixture(scope="module")
def url(worker: tuple[Child, str]) -> str:
    return worker[1]


def test_one_input_gets_clippers_prediction_shape(url: str) -> None:
    _, X_test, _, y_test = digits_split()
    answers = []
    for x in X_test[:20]:
        status, body = http("POST", f"{url}/{APP}/predict", {"input": x.tolist()})
        assert status == 200, body
        answers.append(body)
    for body in answers:
        assert set(body) == {"query_id", "output", "default"}, body
        assert body["default"] is False
        # the label "3" is embedded as its JSON value, as Clipper does with string outputs
        assert isinstance(body["output"], int) and not isinstance(body["output"], bool)
    ids = [b["query_id"] for b in answers]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert sum(b["output"] == int(y) for b, y in zip(answers, y_test[:20], strict=True)) >= 18


def test_a_batch_of_one_is_one_object_and_a_batch_of_many_a_list_in_order(url: str) -> None:
    _, X_test, _, y_test = digits_split()
    xs = [x.tolist() for x in X_test[30:42]]
    status, one = http("POST", f"{url}/{APP}/predict", {"input_batch": [xs[0]]})
    assert status == 200, one
    assert set(one) == {"query_id", "output", "default"}, one

    status, body = http("POST", f"{url}/{APP}/predict", {"input_batch": xs})
    assert status == 200, body
    assert set(body) == {"batch_predictions"}
    batch = body["batch_predictions"]
    assert len(batch) == len(xs)
    assert len({p["query_id"] for p in batch}) == len(xs)
    assert all(p["default"] is False for p in batch), batch
    # each answer is its own input's: the same as the input alone gets (a deterministic model)
    singles = [http("POST", f"{url}/{APP}/predict", {"input": x})[1]["output"] for x in xs]
    assert [p["output"] for p in batch] == singles
    assert sum(p["output"] == int(y) for p, y in zip(batch, y_test[30:42], strict=True)) >= 10


def test_a_default_is_explained_and_a_json_label_embedded(url: str) -> None:
    def explained() -> dict[str, Any] | None:
        status, body = http("POST", f"{url}/{LONELY}/predict", {"input": [0.0] * 64})
        assert status == 200, body
        # until the worker has counted the model's replicas (none), it is the SLO's fault
        assert body["default_explanation"] in {
            clipper.NO_MODELS_EXPLANATION,
            clipper.SLO_EXPLANATION,
        }
        return body if body["default_explanation"] == clipper.NO_MODELS_EXPLANATION else None

    body = wait_for(explained, 60, "the default explained by the missing replicas")
    assert body["default"] is True
    assert body["output"] == {"digit": 7}  # the default label '{"digit": 7}' as JSON


def feedback_for(settings: Settings, app: str) -> list[dict]:
    return [r for r in read_all(settings, topics.FEEDBACK, "Feedback") if r["app"] == app]


def query_features(settings: Settings) -> dict[str, list[float]]:
    return {q["query_id"]: q["features"] for q in read_all(settings, topics.QUERIES, "Query")}


def test_update_is_feedback_on_the_last_query_of_its_input(deployed: Settings, url: str) -> None:
    _, X_test, _, y_test = digits_split()
    x, y = X_test[50].tolist(), int(y_test[50])
    status, predicted = http("POST", f"{url}/{APP}/predict", {"input": x})
    assert status == 200, predicted

    status, ack = http("POST", f"{url}/{APP}/update", {"uid": 4, "input": x, "label": float(y)})
    assert (status, ack) == (200, {"feedback_received": True, "query_id": predicted["query_id"]})
    # an input never predicted is queried first (Clipper's update runs the models on it)
    fresh, fresh_y = X_test[60].tolist(), int(y_test[60])
    status, fresh_ack = http(
        "POST", f"{url}/{APP}/update", {"uid": "bob", "input": fresh, "label": fresh_y}
    )
    assert status == 200 and fresh_ack["query_id"] > predicted["query_id"], fresh_ack
    # by the Clipper query id (this frontend's extension), also with another input
    status, by_id = http(
        "POST",
        f"{url}/{APP}/update",
        {"uid": 4, "input": [0.0] * 64, "label": 1, "query_id": predicted["query_id"]},
    )
    assert (status, by_id["query_id"]) == (200, predicted["query_id"])
    status, unknown = http(
        "POST", f"{url}/{APP}/update", {"uid": 4, "input": x, "label": 1, "query_id": 10**9}
    )
    assert status == 400 and unknown["error"] == clipper.QUERY_ERROR, unknown

    def three_records() -> list[dict] | None:
        got = feedback_for(deployed, APP)
        return got if len(got) >= 3 else None

    records = wait_for(three_records, 30, "the three updates on the feedback topic")
    assert len(records) == 3
    features = query_features(deployed)
    by_label = sorted(records, key=lambda r: r["sent_at_us"])
    first, second, third = by_label
    assert (first["label"], first["user"]) == (str(y), "4")
    assert features[first["query_id"]] == x  # the query that predicted this very input
    assert (second["label"], second["user"]) == (str(fresh_y), "bob")
    assert features[second["query_id"]] == fresh and second["query_id"] != first["query_id"]
    assert (third["query_id"], third["label"]) == (first["query_id"], "1")


def test_metrics_are_json_with_the_workers_counters(url: str) -> None:
    status, _ = http("POST", f"{url}/{APP}/predict", {"input": [0.0] * 64})
    assert status == 200
    status, body = http("GET", f"{url}/metrics")
    assert status == 200
    assert set(body) >= {"counters", "ratio_counters", "gauges"}
    counters = {name: value for entry in body["counters"] for name, value in entry.items()}
    assert counters[f"app:{APP}:num_predictions"]["count"] >= 20 + 13 + 12 + 1
    # the worker's own counters, from the same process
    assert counters[f"clipstream_queries_total{{app={APP}}}"]["count"] >= 40
    # HTTP requests, a batch one each: 20 + 1 + 1 + 12 + 1 + 1 + 1 at least
    requests = counters["clipstream_gateway_requests_total{route=clipper_predict,status=200}"]
    assert requests["count"] >= 37
    ratios = {name: value for entry in body["ratio_counters"] for name, value in entry.items()}
    assert ratios[f"app:{LONELY}:default_prediction_ratio"]["ratio"] == 1.0
    assert ratios[f"app:{APP}:default_prediction_ratio"]["ratio"] == 0.0


@pytest.mark.parametrize(
    ("path", "body", "raw", "status", "error", "cause"),
    [
        ("predict", None, b"{not json", 400, clipper.JSON_ERROR, "not valid JSON"),
        ("predict", [1, 2], None, 400, clipper.JSON_ERROR, "JSON object"),
        ("predict", {}, None, 400, clipper.JSON_ERROR, "exactly one"),
        ("predict", {"input": "abc"}, None, 400, clipper.JSON_ERROR, "array of numbers"),
        ("predict", {"input": [1.0, True]}, None, 400, clipper.JSON_ERROR, "only numbers"),
        ("predict", {"input": [1.0, 2.0]}, None, 400, clipper.JSON_ERROR, "expected 64"),
        ("predict", {"input_batch": []}, None, 400, clipper.JSON_ERROR, "input_batch"),
        (
            "predict",
            {"input": [0.0] * 64, "version": "9"},
            None,
            400,
            clipper.QUERY_ERROR,
            "serving: 1",
        ),
        ("update", {"uid": 1, "input": [0.0] * 64}, None, 400, clipper.JSON_ERROR, "label"),
        (
            "update",
            {"uid": 1, "input": [0.0] * 64, "label": True},
            None,
            400,
            clipper.JSON_ERROR,
            "label",
        ),
        ("update", {"uid": [], "input": [0.0], "label": 1}, None, 400, clipper.JSON_ERROR, "uid"),
    ],
)
def test_bad_requests_get_400_with_error_and_cause(
    url: str, path: str, body: Any, raw: bytes | None, status: int, error: str, cause: str
) -> None:
    got_status, got = http("POST", f"{url}/{APP}/{path}", body, raw)
    assert got_status == status, got
    assert set(got) == {"error", "cause"} and got["error"] == error, got
    assert cause in got["cause"], got


def test_the_serving_version_and_an_unknown_app(url: str) -> None:
    status, body = http("POST", f"{url}/{APP}/predict", {"input": [0.0] * 64, "version": 1})
    assert status == 200 and body["default"] is False, body
    status, body = http("POST", f"{url}/no-such-app/predict", {"input": [0.0] * 64})
    assert (
        status == 404 and body["error"] == clipper.REQUEST_ERROR and "no-such-app" in body["cause"]
    )


def readme_client() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```python\n(import json\nimport numpy as np\n.*?)```", readme, re.S)
    assert found is not None, "the README's Clipper client went missing"
    return found.group(1)


def test_the_readme_clipper_client_runs_as_written(url: str, wide_path: Path) -> None:
    script = readme_client()
    assert "http://localhost:1337/simple-example/predict" in script
    port = int(url.rsplit(":", 1)[1])
    if port != clipper.DEFAULT_PORT:  # 1337 was another worker's: only the port is swapped
        script = script.replace("localhost:1337", f"localhost:{port}")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip().splitlines()[-1]
    answer = ast.literal_eval(printed)  # the client prints the response's dict
    assert set(answer) == {"query_id", "output", "default"}, answer
    assert answer["default"] is False and answer["output"] in range(10)
    # and that app's inputs get the model's own labels as outputs
    _, X_test, _, _ = wide_dataset(dim=200)
    outputs = [
        http("POST", f"{url}/{README_APP}/predict", {"input": x.tolist()})[1]["output"]
        for x in X_test[:20]
    ]
    expected = load_model(wide_path).predict(X_test[:20]).tolist()
    assert outputs == [int(y) for y in expected]


def test_the_clipper_routes_take_the_gateways_tokens(deployed: Settings) -> None:
    token = new_token()
    entry = make_entry("clipper-client", token, [f"{APP}:predict"])
    settings = Settings(**{**deployed.__dict__, "gateway_tokens": entry.line(), "clipper_port": 0})
    gateway = Gateway(settings, registry.current(settings))
    server = clipper.ClipperServer(gateway, settings, None)

    async def calls() -> list[tuple[int, Any]]:
        port = await server.start()
        assert port is not None and port > 0
        base = f"http://127.0.0.1:{port}"
        bearer = {"Authorization": f"Bearer {token}"}
        out = []
        for path, headers, body in [
            (f"/{APP}/predict", {}, {"input": [0.0]}),
            (f"/{APP}/predict", {"Authorization": "Bearer cs_wrong"}, {"input": [0.0]}),
            (f"/{APP}/update", bearer, {"uid": 1, "input": [0.0], "label": 1}),
            (f"/{APP}/predict", bearer, {"input": [0.0]}),  # let in: a bad body, not 401
        ]:
            out.append(await asyncio.to_thread(authorized_http, base + path, headers, body))
        await server.close()
        return out

    try:
        results = asyncio.run(calls())
    finally:
        gateway.close()
    (s1, b1), (s2, b2), (s3, b3), (s4, b4) = results
    assert s1 == 401 and b1["error"] == "Unauthorized" and b1["cause"], b1
    assert s2 == 401, b2
    assert s3 == 403 and b3["error"] == "Forbidden", b3  # the token may predict, not update
    assert s4 == 400 and "expected 64" in b4["cause"], b4


def authorized_http(url: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_clippers_port_taken_is_one_warning_and_no_frontend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = socket.socket()
    # as the server binds: only a listener on the port, not old connections, makes it taken
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            holder.bind(("0.0.0.0", clipper.DEFAULT_PORT))
            holder.listen()
        except OSError:
            pass  # another listener holds it (this module's worker): taken all the same
        server = clipper.ClipperServer(object(), Settings(), None)  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="clipstream.gateway"):
            assert asyncio.run(server.start()) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "port 1337 is taken" in warnings[0], warnings
        assert server.runner is None
        disabled = clipper.ClipperServer(
            object(),  # type: ignore[arg-type]
            Settings(clipper_port=clipper.DISABLED),
            None,
        )
        assert asyncio.run(disabled.start()) is None
    finally:
        holder.close()


def readme_setup() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Clipper's REST API") :]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found is not None, "the README's Clipper set-up went missing"
    return found.group(1)


def test_the_readme_clipper_setup_runs_as_written(
    deployed: Settings, url: str, tmp_path: Path
) -> None:
    """The set-up block, as one bash script against this module's broker (its /tmp/m made
    this test's own): the model trained and deployed, a replica started, the app
    registered; then the README's client gets that model's answer."""
    script = readme_setup().replace("/tmp/m", str(tmp_path / "m"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KAFKA_BOOTSTRAP_SERVERS": deployed.require_bootstrap(),
        "CLIPSTREAM_PARTITIONS": str(deployed.partitions),
    }
    log = tmp_path / "setup.log"
    with log.open("wb") as sink:  # a file: the replica in the background keeps it open
        run = subprocess.Popen(
            ["bash", "-c", "set -euo pipefail\n" + script],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert run.wait(timeout=180) == 0, log.read_text(errors="replace")
        app = registry.current(deployed).app(README_APP)
        assert app["models"] == [WIDE] and app["deadline_ms"] == 2000
        script = readme_client()
        port = int(url.rsplit(":", 1)[1])
        script = script.replace("localhost:1337", f"localhost:{port}")

        def answered() -> dict | None:
            done = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            answer = ast.literal_eval(done.stdout.strip().splitlines()[-1])
            return answer if answer["default"] is False else None

        assert wait_for(answered, 90, "the README's client answered by the model")["output"] in (
            range(10)
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGTERM)  # the replica the block left running
        run.wait(30)
