"""The Clipper frontend's translation over a stand-in gateway (no broker): outputs embedded
as JSON where they parse, a batch sent concurrently and answered in order, defaults
explained as Clipper does, updates joined to the right query through bounded memories,
labels mapped onto ours, and errors in Clipper's shape. The live worker is in
tests/integration/test_clipper_rest.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clipstream.streams.gateway import clipper
from clipstream.streams.gateway.clipper import ClipperFrontend, clipper_output


class FakeRegistry:
    def __init__(self) -> None:
        self.apps = {"a": {"models": ["m"], "input_dim": 2, "default_label": "0"}}
        self.models = {"m": {"version": 3}}

    def app(self, name: str) -> dict[str, Any] | None:
        return self.apps.get(name)

    def model(self, name: str) -> dict[str, Any] | None:
        return self.models.get(name)


class FakeGateway:
    """Answers each query with the sum of its features as the label."""

    def __init__(self, concurrent: int = 1) -> None:
        self.registry = FakeRegistry()
        self.queries: list[dict[str, Any]] = []
        self.feedback_sent: list[dict[str, Any]] = []
        self.default = False
        self.error: str | None = None
        self._started = 0
        self._concurrent = concurrent
        self._all_started = asyncio.Event()

    async def predict(self, app: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if len(body["features"]) != 2:
            return 400, {"error": "expected 2 features, got 1"}
        self._started += 1
        if self._started >= self._concurrent:
            self._all_started.set()
        # a batch not sent concurrently would wait here for ever (the test's timeout)
        await self._all_started.wait()
        qid = f"q{len(self.queries)}"
        self.queries.append({"query_id": qid, **body})
        label = None if self.error else str(sum(body["features"]))
        return 200, {
            "query_id": qid,
            "label": "0" if self.default else label,
            "default": self.default,
            "error": self.error,
        }

    async def feedback(self, app: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.feedback_sent.append(body)
        return 202, {"query_id": body["query_id"], "accepted": True}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_outputs_are_embedded_as_json_where_they_parse() -> None:
    assert clipper_output("7") == 7
    assert clipper_output("2.5") == 2.5
    assert clipper_output('{"digit": 7}') == {"digit": 7}
    assert clipper_output('"x"') == "x"
    assert clipper_output("cat") == "cat"
    assert clipper_output("NaN") == "NaN"  # not JSON
    assert clipper_output(None) is None


def test_a_batch_goes_out_concurrently_and_comes_back_in_order() -> None:
    async def batch() -> tuple[int, dict[str, Any]]:
        gateway = FakeGateway(concurrent=3)
        frontend = ClipperFrontend(gateway)  # type: ignore[arg-type]
        return await frontend.predict("a", {"input_batch": [[1, 2], [3, 4], [5, 6]]})

    status, body = run(batch())
    assert status == 200
    assert [p["output"] for p in body["batch_predictions"]] == [3.0, 7.0, 11.0]
    assert [p["query_id"] for p in body["batch_predictions"]] == [1, 2, 3]


def test_a_batch_of_one_is_a_single_answer_and_a_default_is_explained() -> None:
    async def calls() -> list[tuple[int, dict[str, Any]]]:
        gateway = FakeGateway()
        frontend = ClipperFrontend(gateway, replicas={})  # type: ignore[arg-type]
        out = [await frontend.predict("a", {"input_batch": [[1, 1]]})]
        gateway.default = True
        out.append(await frontend.predict("a", {"input": [1, 1]}))
        frontend.replicas = {"m": 0}
        out.append(await frontend.predict("a", {"input": [1, 1]}))
        return out

    (s1, one), (s2, slo), (s3, none) = run(calls())
    assert (s1, one) == (200, {"query_id": 1, "output": 2.0, "default": False})
    assert slo["default"] is True and slo["default_explanation"] == clipper.SLO_EXPLANATION
    assert none["default_explanation"] == clipper.NO_MODELS_EXPLANATION
    assert (s2, s3) == (200, 200)


def test_errors_come_in_clippers_shape() -> None:
    async def calls() -> list[tuple[int, dict[str, Any]]]:
        gateway = FakeGateway()
        frontend = ClipperFrontend(gateway)  # type: ignore[arg-type]
        bodies = [
            ("a", None),
            ("a", {"input": [1]}),
            ("a", {"input": [1, 2], "input_batch": [[1, 2]]}),
            ("a", {"input": [1e400, 1]}),
            ("a", {"input": [1, 2], "version": "4"}),
            ("nope", {"input": [1, 2]}),
        ]
        out = [await frontend.predict(app, body) for app, body in bodies]
        gateway.error = "the model failed"
        out.append(await frontend.predict("a", {"input": [1, 2]}))
        return out

    results = run(calls())
    assert [s for s, _ in results] == [400, 400, 400, 400, 400, 404, 400]
    assert all(set(b) == {"error", "cause"} for _, b in results)
    errors = [b["error"] for _, b in results]
    assert errors == [clipper.JSON_ERROR] * 4 + [
        clipper.QUERY_ERROR,
        clipper.REQUEST_ERROR,
        clipper.QUERY_ERROR,
    ]
    assert "expected 2 features" in results[1][1]["cause"]
    assert "serving: 3" in results[4][1]["cause"]
    assert results[6][1]["cause"] == "the model failed"


def test_updates_join_the_last_query_of_their_input_in_bounded_memory() -> None:
    async def calls() -> tuple[FakeGateway, list[tuple[int, dict[str, Any]]]]:
        gateway = FakeGateway()
        frontend = ClipperFrontend(gateway, memory=2)  # type: ignore[arg-type]
        out = []
        for x in ([1, 2], [1, 2], [3, 4], [5, 6]):  # ids 1..4: 1 and 2 forgotten
            out.append(await frontend.predict("a", {"input": x}))
        out.append(await frontend.update("a", {"uid": 7, "input": [5, 6], "label": 3.0}))
        out.append(await frontend.update("a", {"uid": "u", "input": [3, 4], "label": 0.5}))
        out.append(await frontend.update("a", {"input": [1, 2], "label": 1, "query_id": 2}))
        # [1, 2]'s last query (2) is forgotten: the input is queried again first
        out.append(await frontend.update("a", {"input": [1, 2], "label": 1}))
        return gateway, out

    gateway, results = run(calls())
    statuses = [s for s, _ in results]
    assert statuses == [200] * 4 + [200, 200, 400, 200], results
    assert results[4][1] == {"feedback_received": True, "query_id": 4}
    assert results[5][1]["query_id"] == 3
    assert results[6][1]["error"] == clipper.QUERY_ERROR
    assert results[7][1]["query_id"] == 5
    assert gateway.feedback_sent == [
        {"query_id": "q3", "label": 3, "user": "7"},
        {"query_id": "q2", "label": "0.5", "user": "u"},
        {"query_id": "q4", "label": 1, "user": None},
    ]
    assert gateway.queries[4] == {"query_id": "q4", "features": [1.0, 2.0]}


@pytest.mark.parametrize(
    "body",
    [
        {"uid": 1, "input": [1, 2]},
        {"uid": 1, "input": [1, 2], "label": "3"},
        {"uid": 1, "input": [1, 2], "label": True},
        {"uid": True, "input": [1, 2], "label": 1},
        {"uid": 1, "input": "x", "label": 1},
        {"uid": 1, "input": [1, 2], "label": 1, "query_id": "1"},
    ],
)
def test_a_bad_update_is_a_json_error(body: dict[str, Any]) -> None:
    frontend = ClipperFrontend(FakeGateway())  # type: ignore[arg-type]
    status, answer = run(frontend.update("a", body))
    assert (status, answer["error"]) == (400, clipper.JSON_ERROR), answer
