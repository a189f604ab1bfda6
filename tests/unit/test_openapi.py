"""docs/openapi.yaml describes exactly the routes and body fields the gateway serves."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from clipstream.streams.gateway import server as gateway
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.limits import MAX_DEADLINE_MS

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def test_the_document_lists_exactly_the_gateways_routes() -> None:
    assert SPEC["openapi"].startswith("3.")
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops}
    assert documented == set(gateway.ROUTES)
    for method, path in gateway.ROUTES:
        responses = SPEC["paths"][path][method]["responses"]
        assert {"400", "401", "403", "404"} <= set(responses), path
    # every route needs the bearer token
    assert SPEC["security"] == [{"bearerToken": []}]
    assert SPEC["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"


def test_request_and_response_fields_match_the_code_and_the_avro_schema() -> None:
    schemas = SPEC["components"]["schemas"]
    assert set(schemas["PredictRequest"]["properties"]) == set(gateway.PREDICT_FIELDS)
    assert set(schemas["FeedbackRequest"]["properties"]) == set(gateway.FEEDBACK_FIELDS)
    avro = json.loads((ROOT / "schemas" / "prediction.avsc").read_text())
    assert set(schemas["Prediction"]["properties"]) == {f["name"] for f in avro["fields"]}
    # the gateway's own default answer has the same shape as a worker's prediction
    default = gateway.Gateway.default_prediction("a", {"default_label": "0"}, "q", None, 1)
    assert set(default) == set(schemas["Prediction"]["properties"])


def test_bodies_are_validated_with_reasons() -> None:
    app = {"input_dim": 2}
    assert gateway.parse_predict({"features": [1, 2.5]}, app)["features"] == [1.0, 2.5]
    for body, reason in [
        ({"features": [1]}, "expected 2 features"),
        ({"features": [1, float("nan")]}, "finite"),
        ({"features": [True, 1]}, "only numbers"),
        ({"features": [1, 2], "deadline_ms": 0}, "must be in (0, 600000]"),
        ({"features": [1, 2], "deadline_ms": MAX_DEADLINE_MS + 1}, "must be in (0, 600000]"),
        ({"features": [1, 2], "deadline_ms": 2.5}, "integer number of milliseconds"),
        ({"features": [1, 2], "deadline_ms": True}, "integer number of milliseconds"),
        ({"features": [1, 2], "user": ""}, "'user'"),
    ]:
        try:
            gateway.parse_predict(body, app)
        except gateway.BadRequest as exc:
            assert reason in str(exc)
        else:
            raise AssertionError(f"{body} was accepted")
    longest = {"features": [1, 2], "deadline_ms": MAX_DEADLINE_MS}
    assert gateway.parse_predict(longest, app)["deadline_ms"] == MAX_DEADLINE_MS
    assert gateway.parse_feedback({"query_id": "q", "label": 3})["label"] == 3
    assert gateway.parse_feedback({"query_id": "q", "reward": 1})["reward"] == 1.0


def test_one_deadline_bound_everywhere() -> None:
    """The gateway, the SDK's Client, the worker and this document share one bound."""
    from clipstream.streams.sdk import Client
    from clipstream.streams.wire import limits
    from clipstream.streams.worker import intake

    field = SPEC["components"]["schemas"]["PredictRequest"]["properties"]["deadline_ms"]
    assert (field["minimum"], field["maximum"]) == (1, MAX_DEADLINE_MS)
    assert intake.deadline_problem is limits.deadline_problem  # the worker's own check
    # no broker: the client must refuse before it produces anything
    client = Client(Settings(bootstrap="127.0.0.1:9"), log_level=0)
    sent: list[tuple] = []
    client._produce = lambda *args: sent.append(args)  # type: ignore[method-assign]
    for bad in (0, -1, MAX_DEADLINE_MS + 1, 2**31):
        try:
            client.send_query("app", [1.0], deadline_ms=bad)
        except ValueError as exc:
            assert "deadline_ms must be in (0, 600000]" in str(exc)
        else:
            raise AssertionError(f"deadline_ms={bad} was accepted")
    assert sent == []
    client.send_query("app", [1.0], deadline_ms=MAX_DEADLINE_MS)
    assert len(sent) == 1
