"""The gateway's OpenAPI document (streams/gateway/openapi.yaml, shipped with the package;
docs/openapi.yaml links to it) describes exactly the routes the gateway serves, and is what
the gateway validates request bodies against (streams/gateway/spec.py). The live gateway
against the document: tests/integration/test_gateway_schemathesis.py."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipstream.streams.gateway import server as gateway
from clipstream.streams.gateway import spec
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.limits import MAX_DEADLINE_MS

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def test_one_document_shipped_with_the_package() -> None:
    docs = ROOT / "docs" / "openapi.yaml"
    # a link, not a copy: the package's file is the one source of truth
    assert docs.is_symlink() and docs.resolve() == spec.PATH.resolve()
    assert spec.PATH == ROOT / "streams" / "gateway" / "openapi.yaml"
    assert spec.document() == SPEC
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "openapi.yaml" in package_data["clipstream.streams.gateway"]
    server_extra = pyproject["project"]["optional-dependencies"]["server"]
    assert {"jsonschema==4.26.0", "PyYAML==6.0.3"} <= set(server_extra)


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


PREDICT_REFUSED = [
    (None, "body must be a JSON object, got null"),
    ([1, 2], "body must be a JSON object"),
    ({}, "body lacks required field 'features'"),
    ({"features": []}, "'features' must have at least 1 item"),
    ({"features": [1]}, "'features': expected 2 features, got 1"),
    ({"features": [1, float("nan")]}, "'features' must be finite"),
    # the schema bounds features to finite doubles; only NaN (not JSON) is left to the code
    ({"features": [1, float("inf")]}, "'features[1]' must be at most 1.7976931348623157e+308"),
    ({"features": [1, -(10**400)]}, "'features[1]' must be at least -1.797"),  # beyond a double
    ({"features": [1, json.loads("1e999")]}, "'features[1]' must be at most"),
    ({"features": [True, 1]}, "'features[0]' must be a number, got true"),
    ({"features": [1, "a"]}, "'features[1]' must be a number"),
    ({"features": [1, 2], "colour": 1}, "unknown fields: ['colour']"),
    ({"features": [1, 2], "deadline_ms": 0}, "'deadline_ms' must be at least 1, got 0"),
    ({"features": [1, 2], "deadline_ms": MAX_DEADLINE_MS + 1}, "'deadline_ms' must be at most"),
    ({"features": [1, 2], "deadline_ms": 2.5}, "'deadline_ms' must be an integer, got 2.5"),
    ({"features": [1, 2], "deadline_ms": True}, "'deadline_ms' must be an integer"),
    ({"features": [1, 2], "user": ""}, "'user' must be a non-empty string"),
    # the document's own word (formerly accepted): optional fields are left out, not null
    ({"features": [1, 2], "user": None}, "'user' must be a string, got null"),
    ({"features": [1, 2], "deadline_ms": None}, "'deadline_ms' must be an integer, got null"),
    ({"features": [1, 2], "query_id": ""}, "'query_id' must be a non-empty string"),
    ({"features": [1, 2], "text": ""}, "'text' must be a non-empty string"),
    ({"features": [1, 2], "text": "\ud800"}, "'text' is not valid Unicode"),
]

FEEDBACK_REFUSED = [
    ({"label": 1}, "body lacks required field 'query_id'"),
    ({"query_id": "q"}, "body must give 'label' or 'reward' (or both)"),
    ({"query_id": "", "label": 1}, "'query_id' must be a non-empty string"),
    ({"query_id": "q", "label": True}, "'label' must be a string or an integer, got true"),
    ({"query_id": "q", "label": 1.5}, "'label' must be a string or an integer"),
    ({"query_id": "q", "reward": 3}, "'reward' must be at most 1, got 3"),
    ({"query_id": "q", "reward": -0.5}, "'reward' must be at least 0"),
    ({"query_id": "q", "reward": float("nan")}, "'reward' must be a number in [0, 1]"),
    ({"query_id": "q", "label": 1, "user": None}, "'user' must be a string, got null"),
    ({"query_id": "q", "label": 1, "user": ""}, "'user' must be a non-empty string"),
    ({"query_id": "q", "label": 1, "why": "x"}, "unknown fields: ['why']"),
]


@pytest.mark.parametrize(("body", "reason"), PREDICT_REFUSED)
def test_predict_bodies_are_validated_with_reasons(body: Any, reason: str) -> None:
    with pytest.raises(gateway.BadRequest) as caught:
        gateway.parse_predict(body, {"input_dim": 2})
    assert reason in str(caught.value)
    # what the schema refuses is refused by the document itself (not by hand-written checks)
    if "finite" not in reason and "expected 2" not in reason and "Unicode" not in reason:
        assert spec.problem("PredictRequest", body) is not None


@pytest.mark.parametrize(("body", "reason"), FEEDBACK_REFUSED)
def test_feedback_bodies_are_validated_with_reasons(body: Any, reason: str) -> None:
    with pytest.raises(gateway.BadRequest) as caught:
        gateway.parse_feedback(body)
    assert reason in str(caught.value)


def test_valid_bodies_become_queries_and_feedback() -> None:
    app = {"input_dim": 2}
    query = gateway.parse_predict({"features": [1, 2.5], "text": "hi", "user": "u"}, app)
    assert query == {
        "features": [1.0, 2.5],
        "user": "u",
        "query_id": None,
        "text": "hi",
        "deadline_ms": None,
    }
    assert gateway.parse_predict({"features": [9.75e51]}, {})["features"] == [9.75e51]
    longest = {"features": [1, 2], "deadline_ms": MAX_DEADLINE_MS}
    assert gateway.parse_predict(longest, app)["deadline_ms"] == MAX_DEADLINE_MS
    assert gateway.parse_feedback({"query_id": "q", "label": 3})["label"] == 3
    assert gateway.parse_feedback({"query_id": "q", "label": ""})["label"] == ""
    assert gateway.parse_feedback({"query_id": "q", "reward": 1})["reward"] == 1.0
    both = gateway.parse_feedback({"query_id": "q", "label": "a", "reward": 0, "user": "u"})
    assert both == {"query_id": "q", "label": "a", "reward": 0.0, "user": "u"}


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
