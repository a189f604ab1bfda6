"""docs/openapi.yaml describes exactly the routes and body fields the gateway serves."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from streams import gateway

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def test_the_document_lists_exactly_the_gateways_routes() -> None:
    assert SPEC["openapi"].startswith("3.")
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops}
    assert documented == set(gateway.ROUTES)
    for method, path in gateway.ROUTES:
        responses = SPEC["paths"][path][method]["responses"]
        assert {"400", "404"} <= set(responses), path


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
        ({"features": [1, 2], "deadline_ms": 0}, "positive integer"),
        ({"features": [1, 2], "user": ""}, "'user'"),
    ]:
        try:
            gateway.parse_predict(body, app)
        except gateway.BadRequest as exc:
            assert reason in str(exc)
        else:
            raise AssertionError(f"{body} was accepted")
    assert gateway.parse_feedback({"query_id": "q", "label": 3})["label"] == 3
    assert gateway.parse_feedback({"query_id": "q", "reward": 1})["reward"] == 1.0
