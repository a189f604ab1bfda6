"""REST gateway on the worker's aiohttp web server: Clipper's REST frontend over Kafka.

``POST /apps/{app}/predict`` produces the query to ``clipstream.queries`` like any other
client and waits for its prediction on ``clipstream.predictions``. The worker answering the
HTTP call need not own the query's partition, so each worker process runs one shared
predictions consumer over all partitions (from the end) and resolves waiting requests by
query id; predictions are keyed by query id, so it decodes only those of its own waiting
requests. A request that sees no prediction by the query's deadline plus a margin is
answered with the app's default output, flagged ``default: true``.

Who may call it is decided before the body is read (``clipstream.streams.gateway.auth``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import threading
import time
import uuid
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from clipstream.models.control.registry import Registry
from clipstream.streams.gateway import spec
from clipstream.streams.gateway.auth import Denied, TokenAuth
from clipstream.streams.runtime.metrics import Prometheus
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire.config import Settings

log = logging.getLogger("clipstream.gateway")

#: (method, path) of every route; openapi.yaml (spec.PATH) must describe exactly these.
ROUTES = (
    ("post", "/apps/{app}/predict"),
    ("post", "/apps/{app}/feedback"),
)

REQUESTS = Counter(
    "clipstream_gateway_requests_total",
    "REST gateway requests by route and HTTP status",
    ["route", "status"],
)
TIMEOUTS = Counter(
    "clipstream_gateway_timeouts_total",
    "REST predictions answered with the default output because none arrived in time",
    ["app"],
)


#: the JSON fields each body may carry: those of openapi.yaml's request schemas, which the
#: bodies are validated against (clipstream.streams.gateway.spec)
PREDICT_FIELDS = tuple(spec.schema("PredictRequest")["properties"])
FEEDBACK_FIELDS = tuple(spec.schema("FeedbackRequest")["properties"])


class BadRequest(ValueError):
    """The request body cannot become a query or feedback record (HTTP 400)."""


def _conform(name: str, body: Any) -> None:
    problem = spec.problem(name, body)
    if problem is not None:
        raise BadRequest(problem)


def parse_predict(body: Any, app: dict[str, Any]) -> dict[str, Any]:
    """Validate a predict body (openapi.yaml's PredictRequest, then what the schema cannot
    say); returns keyword arguments for ``Client.send_query``."""
    _conform("PredictRequest", body)
    # What JSON Schema cannot say: not NaN (not JSON, but Python's reader takes it, and it
    # passes the schema's minimum and maximum, which bound the rest to finite doubles) ...
    features = [float(x) for x in body["features"]]
    if not all(math.isfinite(x) for x in features):
        raise BadRequest("'features' must be finite numbers (no NaN or infinity)")
    # ... the app's own input_dim ...
    dim = app.get("input_dim")
    if dim is not None and len(features) != dim:
        raise BadRequest(f"'features': expected {dim} features, got {len(features)}")
    out: dict[str, Any] = {"features": features}
    for name in ("user", "query_id", "text", "deadline_ms"):
        out[name] = body.get(name)
    _utf8(out)
    return out


def _utf8(fields: dict[str, Any]) -> None:
    """... and strings that UTF-8 can encode (JSON's \\ud800 escape reads as a lone surrogate),
    as the Avro records and the Kafka keys need."""
    for name, value in fields.items():
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                raise BadRequest(f"{name!r} is not valid Unicode (a lone surrogate)") from None


def parse_feedback(body: Any) -> dict[str, Any]:
    """Validate a feedback body (openapi.yaml's FeedbackRequest); returns keyword arguments
    for ``Client.send_feedback``."""
    _conform("FeedbackRequest", body)
    reward = body.get("reward")
    # NaN passes the schema's minimum and maximum (every comparison with it is false)
    if reward is not None and not math.isfinite(reward):
        raise BadRequest(f"'reward' must be a number in [0, 1], got {reward}")
    out = {
        "query_id": body["query_id"],
        "label": body.get("label"),
        "reward": None if reward is None else float(reward),
        "user": body.get("user"),
    }
    _utf8(out)
    return out


class QueryIdInUse(ValueError):
    """Another request of this gateway waits for a prediction of this query id (HTTP 409)."""

    def __init__(self, qid: str) -> None:
        super().__init__(
            f"'query_id' {qid!r} is already waiting for its prediction: use a fresh id per query"
        )


class PredictionWaiter:
    """One consumer of every predictions partition, resolving futures by query id.

    It reads only while REST requests wait: after ``IDLE_S`` with none it pauses (so an
    idle gateway does not read every prediction of the cluster), and the next request first
    has it go on from the current end of each partition, before its query is sent.

    One request per query id at a time: a second one while the first waits is refused
    (``QueryIdInUse``, HTTP 409), as the SDK's Predictor refuses it. Sharing the first's
    prediction would hand it to a caller whose token may be for another app; replacing
    the first's waiter (as before) left the first without its answer."""

    IDLE_S = 5.0

    def __init__(self, settings: Settings) -> None:
        self.reader = PredictionReader(settings, sensor=Prometheus())
        # keyed by the query id's UTF-8 bytes, as the predictions' Kafka keys are
        self._waiting: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: set while the reader reads from where every waiting query's prediction will be
        self._active = threading.Event()
        self._active.set()
        self._wake = threading.Event()
        self._last_wait = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gateway-predictions", daemon=True)
        self._thread.start()

    async def expect(self, qid: str, timeout_s: float = 30.0) -> asyncio.Future[dict[str, Any]]:
        """Register interest before the query is sent, so its answer cannot be missed.

        Raises QueryIdInUse while another request waits for ``qid``. Waits at most
        ``timeout_s`` for an idle reader to resume, else raises TimeoutError (having
        forgotten the request)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        key = qid.encode()
        with self._lock:
            if key in self._waiting:
                raise QueryIdInUse(qid)
            self._waiting[key] = (loop, future)
            self._last_wait = time.monotonic()
            idle = not self._active.is_set()
            if idle:
                self._wake.set()
        if idle:
            try:
                resumed = await asyncio.to_thread(self._active.wait, max(timeout_s, 0.0))
            except BaseException:  # cancelled: the request is gone
                self.forget(qid, future)
                raise
            if not resumed:
                self.forget(qid, future)
                raise TimeoutError("the predictions reader did not resume")
        return future

    def forget(self, qid: str, future: asyncio.Future[Any] | None = None) -> None:
        """Stop waiting for ``qid`` (only if ``future`` is the one waiting, when given)."""
        key = qid.encode()
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is not None and (future is None or waiting[1] is future):
                del self._waiting[key]

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._active.is_set():
                self._wake.wait()  # a request, or close()
                if self._stop.is_set():
                    break
                self._wake.clear()
                self.reader.resume_at_end()
                self._active.set()
                continue
            try:
                # The reader tests each key against _waiting without the lock: a dict
                # membership test is atomic, and an id added meanwhile was not sent yet.
                records = self.reader.poll(0.1, keys=self._waiting)
            except Exception:  # a consumer error must not stop every REST prediction
                log.exception("predictions consumer")
                continue
            for record in records:
                with self._lock:
                    waiting = self._waiting.pop(record["query_id"].encode(), None)
                if waiting is not None:
                    loop, future = waiting
                    loop.call_soon_threadsafe(_resolve, future, record)
            with self._lock:
                if not self._waiting and time.monotonic() - self._last_wait > self.IDLE_S:
                    self.reader.pause()
                    self._active.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.reader.close()


def _resolve(future: asyncio.Future[Any], record: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(record)


def prediction_json(record: dict[str, Any]) -> dict[str, Any]:
    """The prediction as JSON (bytes-free: every field of the Avro record is JSON-able)."""
    return {k: v for k, v in record.items() if k != "received_at_us"}


class Gateway:
    """The two REST operations, independent of the web framework (tested directly too)."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.auth = TokenAuth(settings)
        self.tls = bool(settings.gateway_certfile)
        if self.auth.open:
            log.warning(
                "the REST gateway is OPEN (CLIPSTREAM_GATEWAY_AUTH=open): anyone who reaches "
                "its port may predict and send feedback for every app"
            )
        elif not self.auth.tokens:
            log.warning(
                "the REST gateway refuses every request: no tokens configured (set "
                "CLIPSTREAM_GATEWAY_TOKENS_FILE, or CLIPSTREAM_GATEWAY_AUTH=open on a closed "
                "network)"
            )
        elif not self.tls:
            log.warning(
                "REST bearer tokens travel in clear over HTTP: set CLIPSTREAM_GATEWAY_CERTFILE "
                "and CLIPSTREAM_GATEWAY_KEYFILE, or terminate TLS in front of the gateway"
            )
        self.client = Client(settings)
        self.waiter = PredictionWaiter(settings)

    def describe(self) -> str:
        """How the gateway listens, for the worker's start-up line."""
        return f"{'https' if self.tls else 'http'}, {self.auth.describe()}"

    def authorize(self, operation: str, app_name: str, authorization: str | None) -> Denied | None:
        """None if a request with this Authorization header may call ``operation``."""
        return self.auth.check(operation, app_name, authorization)

    async def predict(self, app_name: str, body: Any) -> tuple[int, dict[str, Any]]:
        app = self.registry.app(app_name)
        if app is None:
            return 404, {"error": f"unknown app {app_name!r}"}
        try:
            query = parse_predict(body, app)
        except BadRequest as exc:
            return 400, {"error": str(exc)}
        qid = query.pop("query_id") or uuid.uuid4().hex
        deadline_ms = query["deadline_ms"] or app["deadline_ms"]
        loop = asyncio.get_running_loop()
        # one budget from here: waiting for an idle reader to resume counts against it
        give_up_at = loop.time() + (deadline_ms + self.settings.gateway_margin_ms) / 1000
        sent_at_us = time.time_ns() // 1000
        future: asyncio.Future[dict[str, Any]] | None = None
        try:
            future = await self.waiter.expect(qid, give_up_at - loop.time())
            self.client.send_query(app_name, query_id=qid, **query)
            return 200, prediction_json(await asyncio.wait_for(future, give_up_at - loop.time()))
        except QueryIdInUse as exc:
            return 409, {"error": str(exc)}
        except TimeoutError:
            TIMEOUTS.labels(app_name).inc()
            return 200, self.default_prediction(app_name, app, qid, query["user"], sent_at_us)
        finally:
            if future is not None:
                self.waiter.forget(qid, future)

    @staticmethod
    def default_prediction(
        app_name: str, app: dict[str, Any], qid: str, user: str | None, sent_at_us: int
    ) -> dict[str, Any]:
        return {
            "query_id": qid,
            "app": app_name,
            "user": user,
            "label": app.get("default_label"),
            "score": None,
            "models": [],
            "answers": [],
            "cache_hit": False,
            "default": True,
            "error": "no prediction from the worker by the deadline (gateway timeout)",
            "sent_at_us": sent_at_us,
            "emitted_at_us": time.time_ns() // 1000,
            "worker_us": 0,
        }

    async def feedback(self, app_name: str, body: Any) -> tuple[int, dict[str, Any]]:
        if self.registry.app(app_name) is None:
            return 404, {"error": f"unknown app {app_name!r}"}
        try:
            fb = parse_feedback(body)
        except BadRequest as exc:
            return 400, {"error": str(exc)}
        qid = fb.pop("query_id")
        self.client.send_feedback(qid, app_name, **fb)
        return 202, {"query_id": qid, "accepted": True}

    def close(self) -> None:
        self.waiter.close()
        self.client.producer.flush(5)


async def _read_json(request: Any) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def web_app(gateway: Gateway) -> web.Application:
    """The gateway's routes, and ``GET /`` (a health check: ``{"status": "OK"}``), on an
    aiohttp application; nothing else is served."""

    def handler(route: str, operation: Any) -> Any:
        async def post(request: web.Request) -> web.Response:
            app = request.match_info["app"]
            denied = gateway.authorize(route, app, request.headers.get("Authorization"))
            if denied is not None:
                REQUESTS.labels(route, str(denied.status)).inc()
                return _json({"error": denied.reason}, denied.status, denied.headers())
            try:
                status, payload = await operation(app, await _read_json(request))
            except BadRequest as exc:
                status, payload = 400, {"error": str(exc)}
            REQUESTS.labels(route, str(status)).inc()
            return _json(payload, status)

        post.__name__ = f"gateway_{route}"
        return post

    async def health(request: web.Request) -> web.Response:
        return _json({"status": "OK"})

    application = web.Application()
    application.router.add_get("/", health, name="health")
    operations = {"predict": gateway.predict, "feedback": gateway.feedback}
    for method, path in ROUTES:
        route = path.rsplit("/", 1)[-1]
        application.router.add_route(
            method.upper(), path, handler(route, operations[route]), name=f"gateway_{route}"
        )
    return application


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response, compact UTF-8 (as orjson writes it)."""
    return web.Response(
        body=orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


class WebServer:
    """The gateway's HTTP(S) listener: ``settings.web_port`` (0: a free port, the one bound
    is ``port``) on all interfaces, TLS when ``ssl_context`` is given."""

    #: how long a stop waits for requests still being answered before cancelling them
    SHUTDOWN_S = 5.0

    def __init__(
        self, gateway: Gateway, settings: Settings, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        self.runner = web.AppRunner(
            web_app(gateway),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.SHUTDOWN_S,
        )
        self._site: web.TCPSite | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the port bound."""
        await self.runner.setup()
        self._site = web.TCPSite(
            self.runner, "0.0.0.0", self.settings.web_port, ssl_context=self.ssl_context
        )
        await self._site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop_listening(self) -> None:
        """Accept no more connections; requests under way go on."""
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()

    async def close(self) -> None:
        """Stop listening, give requests under way ``SHUTDOWN_S`` to finish, then cancel
        those left."""
        await self.stop_listening()
        await self.runner.cleanup()
