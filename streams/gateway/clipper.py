"""Clipper's REST query frontend (predict, update, metrics) on the worker, over the gateway.

A Clipper client talks to a worker unchanged: ``POST /{app}/predict`` with ``{"input":
[...]}`` (or ``{"input_batch": [[...], ...]}``, sent concurrently) gets ``{"query_id": INT,
"output": ..., "default": BOOL}``, ``"default_explanation"`` when the default was used; a
batch of more than one comes back as ``{"batch_predictions": [...]}``. Each query goes
through ``Gateway.predict`` (the same Kafka path, deadline and default as
``/apps/{app}/predict``); this module only translates the shapes. The output is the
prediction's label, embedded as its JSON value where it parses as JSON (``"7"`` -> ``7``),
as Clipper does. Errors are ``{"error": NAME, "cause": TEXT}`` with HTTP 400 (404 for an
unknown app, 401/403 as the gateway's auth decides).

Query ids: Clipper's are integers, ours are strings unique across workers. Each frontend
numbers its queries (1, 2, ...) and remembers, in bounded maps (``MEMORY`` entries), which
of our query ids each number stands for and which query last predicted each input.

Feedback (``POST /{app}/update``, ``{"uid": ..., "input": [...], "label": NUMBER}``):
Clipper's update is feedback on an *input*, so it is joined to the last query of that
exact input this frontend answered for the app; with ``"query_id": INT`` (an extension) to
the prediction with that Clipper id. If neither is known (another worker answered it, or
it was forgotten), the input is queried first, as Clipper's update evaluates the models on
it, and the feedback goes to that query. ``uid`` becomes the feedback's ``user``; an
integral label is sent as an integer label (``3.0`` -> ``"3"``), any other as its decimal
text. The reply is ``{"feedback_received": true, "query_id": INT}``.

``GET /metrics`` is the process's Prometheus counters and gauges as JSON, in Clipper's
report layout (``counters``, ``ratio_counters``, ``gauges``), plus Clipper's per-app
``app:NAME:num_predictions`` and ``app:NAME:default_prediction_ratio``; like the Prometheus
endpoint it needs no token.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import ssl
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import prometheus_client
from aiohttp import web

from clipstream.streams.gateway.server import REQUESTS, BadRequest, Gateway, _json, _read_json
from clipstream.streams.wire.config import Settings

log = logging.getLogger("clipstream.gateway")

#: Clipper's default port, used only where free (any other configured port must be free)
DEFAULT_PORT = 1337
#: ``clipper_port`` that turns the Clipper frontend off
DISABLED = -1
#: Clipper query ids, and inputs, remembered for feedback
MEMORY = 100_000

SLO_EXPLANATION = "Failed to retrieve a prediction response within the specified latency SLO"
NO_MODELS_EXPLANATION = "No connected models found for query"

JSON_ERROR = "Json error"
QUERY_ERROR = "Query processing error"
REQUEST_ERROR = "Request error"

PREDICT_SCHEMA = '{"input": [number, ...]} or {"input_batch": [[number, ...], ...]}'
UPDATE_SCHEMA = '{"uid": int | string, "input": [number, ...], "label": number}'

#: (method, path) of the Clipper routes
ROUTES = (
    ("post", "/{app}/predict"),
    ("post", "/{app}/update"),
    ("get", "/metrics"),
)


class ClipperError(Exception):
    """A request answered with Clipper's error body."""

    def __init__(self, status: int, error: str, cause: str) -> None:
        super().__init__(cause)
        self.status, self.error, self.cause = status, error, cause

    def body(self) -> dict[str, str]:
        return {"error": self.error, "cause": self.cause}


def clipper_output(label: Any) -> Any:
    """A label as Clipper returns an output: its JSON value where it parses as JSON."""
    if not isinstance(label, str):
        return label
    try:
        return json.loads(label, parse_constant=_no_constant)
    except ValueError:
        return label


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity are not JSON: the output stays a string


def _numbers(value: Any, what: str, schema: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ClipperError(
            400, JSON_ERROR, f"'{what}' must be a non-empty array of numbers; expected {schema}"
        )
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        raise ClipperError(
            400, JSON_ERROR, f"'{what}' must contain only numbers; expected {schema}"
        )
    try:
        numbers = [float(x) for x in value]
    except OverflowError:
        numbers = [math.inf]
    if not all(math.isfinite(x) for x in numbers):
        raise ClipperError(400, JSON_ERROR, f"'{what}' must be finite numbers (no NaN or infinity)")
    return numbers


def _input_key(app: str, features: list[float]) -> tuple[str, bytes]:
    packed = struct.pack(f"<{len(features)}d", *features)
    return app, hashlib.blake2b(packed, digest_size=16).digest()


class _Bounded(OrderedDict):
    """An insertion-ordered map keeping its newest ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class ClipperFrontend:
    """Clipper's predict, update and metrics over a ``Gateway`` (framework-free)."""

    def __init__(
        self, gateway: Gateway, replicas: Mapping[str, int] | None = None, memory: int = MEMORY
    ) -> None:
        self.gateway = gateway
        #: live replicas per model, where known (the worker's count)
        self.replicas = replicas if replicas is not None else {}
        self._numbers = itertools.count(1)
        self._ids: _Bounded = _Bounded(memory)  # Clipper id -> (app, our query id)
        self._last: _Bounded = _Bounded(memory)  # (app, input digest) -> Clipper id
        self._counts: dict[str, list[int]] = {}  # app -> [predictions, defaults]

    def _app(self, app_name: str) -> dict[str, Any]:
        app = self.gateway.registry.app(app_name)
        if app is None:
            raise ClipperError(404, REQUEST_ERROR, f"unknown app {app_name!r}")
        return app

    async def predict(self, app_name: str, body: Any) -> tuple[int, dict[str, Any]]:
        try:
            app = self._app(app_name)
            inputs = self._parse_predict(body, app)
            answers = await asyncio.gather(*(self._one(app_name, app, x) for x in inputs))
        except ClipperError as exc:
            return exc.status, exc.body()
        if len(answers) == 1:
            return 200, answers[0]
        return 200, {"batch_predictions": list(answers)}

    def _parse_predict(self, body: Any, app: dict[str, Any]) -> list[list[float]]:
        if not isinstance(body, dict):
            raise ClipperError(400, JSON_ERROR, f"the body must be a JSON object: {PREDICT_SCHEMA}")
        if ("input" in body) == ("input_batch" in body):
            raise ClipperError(
                400, JSON_ERROR, f"give exactly one of 'input' and 'input_batch': {PREDICT_SCHEMA}"
            )
        self._check_version(body.get("version"), app)
        if "input" in body:
            return [_numbers(body["input"], "input", PREDICT_SCHEMA)]
        batch = body["input_batch"]
        if not isinstance(batch, list) or not batch:
            raise ClipperError(
                400,
                JSON_ERROR,
                f"'input_batch' must be a non-empty array of inputs: {PREDICT_SCHEMA}",
            )
        return [_numbers(x, f"input_batch[{i}]", PREDICT_SCHEMA) for i, x in enumerate(batch)]

    def _check_version(self, version: Any, app: dict[str, Any]) -> None:
        """``version``, if given, must be the serving version of one of the app's models."""
        if version is None:
            return
        if isinstance(version, bool) or not isinstance(version, str | int):
            raise ClipperError(400, JSON_ERROR, "'version' must be a string or an integer")
        serving = set()
        for name in app.get("models", []):
            spec = self.gateway.registry.model(name)
            if spec is not None:
                serving.add(str(spec["version"]))
        if str(version) not in serving:
            raise ClipperError(
                400,
                QUERY_ERROR,
                f"version {version!r} is not the serving version of any model of the app "
                f"(serving: {', '.join(sorted(serving)) or 'none'})",
            )

    async def _one(
        self, app_name: str, app: dict[str, Any], features: list[float], user: str | None = None
    ) -> dict[str, Any]:
        """One query through the gateway; its answer in Clipper's shape."""
        body: dict[str, Any] = {"features": features}
        if user is not None:
            body["user"] = user
        number = next(self._numbers)  # numbered as sent: a batch's ids follow its order
        status, prediction = await self.gateway.predict(app_name, body)
        if status == 404:
            raise ClipperError(404, REQUEST_ERROR, prediction.get("error", "unknown app"))
        if status != 200:
            raise ClipperError(
                400, JSON_ERROR, f"{prediction.get('error')}; expected {PREDICT_SCHEMA}"
            )
        if prediction["label"] is None and not prediction["default"]:
            raise ClipperError(400, QUERY_ERROR, prediction.get("error") or "no output")
        self._ids.put(number, (app_name, prediction["query_id"]))
        self._last.put(_input_key(app_name, features), number)
        counts = self._counts.setdefault(app_name, [0, 0])
        counts[0] += 1
        answer = {
            "query_id": number,
            "output": clipper_output(prediction["label"]),
            "default": bool(prediction["default"]),
        }
        if prediction["default"]:
            counts[1] += 1
            answer["default_explanation"] = self._explain(app)
        return answer

    def _explain(self, app: dict[str, Any]) -> str:
        """Clipper's default explanation: no model of the app has a live replica (as far as
        the worker knows), or none answered in time."""
        models = app.get("models", [])
        if not models or all(self.replicas.get(m, 1) == 0 for m in models):
            return NO_MODELS_EXPLANATION
        return SLO_EXPLANATION

    async def update(self, app_name: str, body: Any) -> tuple[int, dict[str, Any]]:
        try:
            app = self._app(app_name)
            features, label, user, number = self._parse_update(body)
            qid = None
            if number is not None:
                known = self._ids.get(number)
                if known is None or known[0] != app_name:
                    raise ClipperError(
                        400,
                        QUERY_ERROR,
                        f"query_id {number} is not a query of {app_name!r} this frontend remembers",
                    )
                qid = known[1]
            else:
                number = self._last.get(_input_key(app_name, features))
                known = None if number is None else self._ids.get(number)
                if known is not None:
                    qid = known[1]
            if qid is None:  # no query of this input known here: query it, as Clipper does
                answer = await self._one(app_name, app, features, user)
                number = answer["query_id"]
                qid = self._ids[number][1]
            status, ack = await self.gateway.feedback(
                app_name, {"query_id": qid, "label": label, "user": user}
            )
            if status != 202:
                raise ClipperError(400, JSON_ERROR, f"{ack.get('error')}; expected {UPDATE_SCHEMA}")
        except ClipperError as exc:
            return exc.status, exc.body()
        return 200, {"feedback_received": True, "query_id": number}

    @staticmethod
    def _parse_update(body: Any) -> tuple[list[float], str | int, str | None, int | None]:
        if not isinstance(body, dict):
            raise ClipperError(400, JSON_ERROR, f"the body must be a JSON object: {UPDATE_SCHEMA}")
        features = _numbers(body.get("input"), "input", UPDATE_SCHEMA)
        label = body.get("label")
        if (
            isinstance(label, bool)
            or not isinstance(label, int | float)
            or (isinstance(label, float) and not math.isfinite(label))
        ):
            raise ClipperError(400, JSON_ERROR, f"'label' must be a finite number: {UPDATE_SCHEMA}")
        uid = body.get("uid")
        if uid is not None and (
            isinstance(uid, bool) or not isinstance(uid, str | int) or uid == ""
        ):
            raise ClipperError(
                400, JSON_ERROR, f"'uid' must be an integer or a string: {UPDATE_SCHEMA}"
            )
        number = body.get("query_id")
        if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
            raise ClipperError(400, JSON_ERROR, "'query_id' must be the integer a predict returned")
        as_label: str | int = (
            label if isinstance(label, int) else int(label) if label.is_integer() else repr(label)
        )
        return features, as_label, None if uid is None else str(uid), number

    def metrics(self) -> dict[str, Any]:
        """The process's counters and gauges, and Clipper's per-app ones, as JSON."""
        counters: list[dict[str, Any]] = []
        gauges: list[dict[str, Any]] = []
        for family in prometheus_client.REGISTRY.collect():
            if family.type not in ("counter", "gauge"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                name = f"{sample.name}{{{labels}}}" if labels else sample.name
                if family.type == "counter":
                    counters.append({name: {"count": sample.value}})
                else:
                    gauges.append({name: {"value": sample.value}})
        ratios = []
        for app, (predictions, defaults) in sorted(self._counts.items()):
            counters.append({f"app:{app}:num_predictions": {"count": predictions}})
            ratio = defaults / predictions if predictions else 0.0
            ratios.append({f"app:{app}:default_prediction_ratio": {"ratio": ratio}})
        return {"counters": counters, "ratio_counters": ratios, "gauges": gauges}


def clipper_app(frontend: ClipperFrontend) -> web.Application:
    """Clipper's routes on an aiohttp application, with the gateway's auth."""
    gateway = frontend.gateway

    def handler(route: str, operation: str, call: Any) -> Any:
        async def post(request: web.Request) -> web.Response:
            app = request.match_info["app"]
            denied = gateway.authorize(operation, app, request.headers.get("Authorization"))
            if denied is not None:
                REQUESTS.labels(route, str(denied.status)).inc()
                error = "Unauthorized" if denied.status == 401 else "Forbidden"
                body = {"error": error, "cause": denied.reason}
                return _json(body, denied.status, denied.headers())
            try:
                status, payload = await call(app, await _read_json(request))
            except BadRequest as exc:
                status, payload = 400, {"error": JSON_ERROR, "cause": str(exc)}
            REQUESTS.labels(route, str(status)).inc()
            return _json(payload, status)

        post.__name__ = route
        return post

    async def metrics(request: web.Request) -> web.Response:
        return _json(frontend.metrics())

    application = web.Application()
    application.router.add_post(
        "/{app}/predict", handler("clipper_predict", "predict", frontend.predict)
    )
    application.router.add_post(
        "/{app}/update", handler("clipper_update", "feedback", frontend.update)
    )
    application.router.add_get("/metrics", metrics)
    return application


class ClipperServer:
    """The Clipper frontend's listener on ``settings.clipper_port`` (``DISABLED``: none; 0:
    a free port). Clipper's default 1337 is skipped with one warning when taken."""

    def __init__(
        self,
        gateway: Gateway,
        settings: Settings,
        ssl_context: ssl.SSLContext | None,
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        self.frontend = ClipperFrontend(gateway, replicas)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int | None:
        """Listen; returns the port bound, or None (disabled, or 1337 taken)."""
        port = self.settings.clipper_port
        if port == DISABLED:
            return None
        if port < 0:
            raise ValueError(f"CLIPSTREAM_CLIPPER_PORT must be a port, 0 or {DISABLED}: {port}")
        runner = web.AppRunner(
            clipper_app(self.frontend), access_log=None, handle_signals=False, shutdown_timeout=5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, "0.0.0.0", port, ssl_context=self.ssl_context).start()
        except OSError as exc:
            await runner.cleanup()
            if port != DEFAULT_PORT:
                raise
            log.warning(
                "Clipper REST frontend not started: port %d is taken (%s); set "
                "CLIPSTREAM_CLIPPER_PORT to another port, 0 for a free one, or %d for none",
                port,
                exc.strerror or exc,
                DISABLED,
            )
            return None
        self.runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop_listening(self) -> None:
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
