"""Faust integration (``pip install 'clipstream[faust]'``): records, a codec, and predict().

A Faust app talks to clipstream through ordinary Faust topics::

    import faust
    from clipstream.streams.integrations.faust import Clipstream, Prediction

    app = faust.App("my-app", broker="kafka://localhost:9092")
    clip = Clipstream(app)  # once per app
    predictions = app.topic("clipstream.predictions", key_type=str, value_type=Prediction,
                            key_serializer="raw", value_serializer="clipstream")

``Query``, ``Prediction`` and ``Feedback`` are ``faust.Record`` types with the fields of
``schemas/query.avsc``, ``prediction.avsc`` and ``feedback.avsc``; the ``"clipstream"``
codec (registered when this module is imported) writes and reads them in clipstream's
wire format (``clipstream.streams.wire.codec``: Avro, single-object encoded), so records
a Faust app sends are read by the worker and predictions the worker writes are read by
the app. Keys are the query id (UTF-8, ``key_serializer="raw"``) on all three topics:
aiokafka's default partitioner is Kafka's murmur2, like the SDK's (librdkafka's
``murmur2_random``), so a query and its feedback sent from Faust land on the partition
the SDK would have put them on. ``Clipstream.queries``, ``.predictions`` and
``.feedback`` are these topics, ready made.

``Clipstream.predict`` awaits one prediction from inside an agent; it is
``clipstream.streams.sdk_async.AsyncPredictor`` (one background reader of
clipstream.predictions shared by every concurrent await), opened when the worker starts
and closed when it stops. ``Clipstream.send_feedback`` sends feedback through the SDK.
This module imports Faust: nothing on the worker's hot path imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import faust
import mode
from faust.serializers import codecs

from clipstream.streams.sdk_async import AsyncPredictor
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings

#: the codec's name: ``value_serializer="clipstream"``
CODEC = "clipstream"


class Query(faust.Record, namespace="clipstream.Query", serializer=CODEC):
    """One prediction request (``schemas/query.avsc``). ``sent_at_us`` 0 (the default) is
    stamped with the time the record is encoded, that is sent."""

    query_id: str
    app: str
    user: str | None = None
    features: list[float] = []  # Faust copies a default per record
    raw: bytes | None = None
    text: str | None = None
    sent_at_us: int = 0
    deadline_ms: int | None = None


class ModelAnswer(faust.Record, namespace="clipstream.ModelAnswer"):
    """One consulted model's own answer inside a Prediction."""

    model: str
    version: int
    label: str | None = None
    score: float | None = None
    prob: float = 1.0
    error: str | None = None
    cache_hit: bool = False


class Prediction(faust.Record, namespace="clipstream.Prediction", serializer=CODEC):
    """Exactly one per query id (``schemas/prediction.avsc``); ``default`` is true when the
    app's default output was used."""

    query_id: str
    app: str
    user: str | None = None
    label: str | None = None
    score: float | None = None
    models: list[str] = []
    answers: list[ModelAnswer] = []
    cache_hit: bool = False
    default: bool = False
    error: str | None = None
    sent_at_us: int = 0
    emitted_at_us: int = 0
    worker_us: int = 0


class Feedback(faust.Record, namespace="clipstream.Feedback", serializer=CODEC):
    """Ground truth (``label``) or a reward in [0, 1] for an earlier query
    (``schemas/feedback.avsc``); keyed like the query. ``sent_at_us`` 0 is stamped as
    Query's is."""

    query_id: str
    app: str
    user: str | None = None
    label: str | None = None
    reward: float | None = None
    sent_at_us: int = 0


#: wire kind -> Record type, for the kinds a Faust app reads or writes
RECORDS: dict[str, type[faust.Record]] = {
    "Query": Query,
    "Prediction": Prediction,
    "Feedback": Feedback,
}
_KINDS = tuple(RECORDS)
_BY_NAMESPACE = {record._options.namespace: kind for kind, record in RECORDS.items()}
_BLESSED = "__faust"


class ClipstreamCodec(codecs.Codec):
    """Faust codec for clipstream's wire format: a Query, Prediction or Feedback record
    (a Record of this module, or a mapping with its fields) to single-object encoded Avro
    and back. Decoding tells the kind from the schema fingerprint and returns the Record;
    bytes of any other kind or schema raise ``clipstream.streams.wire.codec.DecodeError``
    (which Faust's stream reports as a ``ValueDecodeError``, as for any undecodable
    value)."""

    def _dumps(self, obj: Any) -> bytes:
        kind, fields = _wire_fields(obj)
        if kind in ("Query", "Feedback") and not fields.get("sent_at_us"):
            fields["sent_at_us"] = now_us()
        return codec.encode(kind, fields)

    def _loads(self, s: bytes) -> Any:
        kind = codec.kind_of(s, _KINDS)
        if kind is None:
            raise codec.DecodeError(
                f"not a clipstream {'/'.join(_KINDS)} record: no known schema header"
            )
        return to_record(kind, codec.decode(kind, s))


def to_record(kind: str, fields: Mapping[str, Any]) -> faust.Record:
    """The Record of ``kind`` for a decoded wire record (extra keys, as the SDK's
    ``received_at_us``, left out)."""
    record_type = RECORDS[kind]
    known = record_type._options.fields
    values = {name: value for name, value in fields.items() if name in known}
    if kind == "Prediction":
        values["answers"] = [
            answer if isinstance(answer, ModelAnswer) else ModelAnswer(**answer)
            for answer in values.get("answers", [])
        ]
    return record_type(**values)


def _wire_fields(obj: Any) -> tuple[str, dict[str, Any]]:
    """(kind, the record as plain Python values) for a Record or a mapping."""
    if isinstance(obj, faust.Record):
        namespace = obj._options.namespace
        fields: dict[str, Any] = obj.asdict()
    elif isinstance(obj, Mapping):
        fields = dict(obj)
        namespace = (fields.pop(_BLESSED, None) or {}).get("ns")
    else:
        raise TypeError(f"the clipstream codec encodes records, not {type(obj).__name__}")
    kind = _BY_NAMESPACE.get(namespace) if namespace else None
    if kind is None:
        raise TypeError(
            f"the clipstream codec encodes {', '.join(_KINDS)} records, "
            f"not {namespace or 'a mapping without a Faust namespace'}"
        )
    return kind, {name: _plain(value) for name, value in fields.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, faust.Record):
        return {k: _plain(v) for k, v in value.asdict().items()}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if k != _BLESSED}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


codecs.register(CODEC, ClipstreamCodec())


def settings_for(app: faust.App, settings: Settings | None = None) -> Settings:
    """Settings for the SDK inside ``app``: ``settings`` (or the environment's,
    ``Settings.from_env()``) pointed at the app's broker unless they name one."""
    settings = settings or Settings.from_env()
    if settings.bootstrap:
        return settings
    hosts = ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)
    return dataclasses.replace(settings, bootstrap=hosts)


class Clipstream:
    """clipstream inside one Faust app: create it once, at module level, next to the app.

    ``predict`` and ``send_feedback`` are awaited from agents; the SDK's predictor behind
    them is opened when the Faust worker starts (or on first use) and closed when it
    stops. ``queries``, ``predictions`` and ``feedback`` are the Faust topics."""

    def __init__(self, app: faust.App, settings: Settings | None = None) -> None:
        self.app = app
        self._settings = settings
        self._predictor: AsyncPredictor | None = None
        self._opening = asyncio.Lock()
        keyed = {"key_type": str, "key_serializer": "raw", "value_serializer": CODEC}
        self.queries = app.topic(topics.QUERIES, value_type=Query, **keyed)
        self.predictions = app.topic(topics.PREDICTIONS, value_type=Prediction, **keyed)
        self.feedback = app.topic(topics.FEEDBACK, value_type=Feedback, **keyed)
        owner = self

        class ClipstreamService(mode.Service):
            """Opens the predictor as the worker starts, closes it as the worker stops."""

            async def on_start(self) -> None:
                await owner.open()

            async def on_stop(self) -> None:
                await owner.close()

        app.service(ClipstreamService)

    @property
    def settings(self) -> Settings:
        return settings_for(self.app, self._settings)

    async def open(self) -> AsyncPredictor:
        """The predictor, created once (it connects and finds the predictions' end
        offsets, in a thread: the event loop is not blocked)."""
        async with self._opening:
            if self._predictor is None:
                self._predictor = await asyncio.to_thread(AsyncPredictor, self.settings)
            return self._predictor

    async def predict(
        self,
        app_name: str,
        features: Sequence[float] = (),
        *,
        user: str | None = None,
        timeout: float | None = 10.0,
        **kw: Any,
    ) -> Prediction:
        """Send a query and await its prediction (``AsyncPredictor.predict``'s semantics;
        ``query_id``, ``deadline_ms``, ``raw`` and ``text`` as ``Client.send_query``'s). The
        worker answers by the deadline, with the app's default (``default`` true) when no
        model could; ``TimeoutError`` means no answer at all came within ``timeout``."""
        predictor = await self.open()
        got = await predictor.predict(app_name, features, timeout=timeout, user=user, **kw)
        return to_record("Prediction", got)  # type: ignore[return-value]

    async def send_feedback(
        self,
        query_id: str,
        app_name: str,
        *,
        label: str | int | None = None,
        reward: float | None = None,
        user: str | None = None,
    ) -> None:
        """Feedback for an earlier query (``Client.send_feedback``'s arguments), keyed and
        partitioned as the SDK does. Sending a ``Feedback`` record to ``self.feedback``
        does the same through Faust's producer."""
        predictor = await self.open()
        await predictor.client.send_feedback(
            query_id, app_name, label=label, reward=reward, user=user
        )

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until the queries and feedback sent through the SDK are delivered."""
        if self._predictor is not None:
            await self._predictor.client.flush(timeout)

    async def close(self) -> None:
        predictor, self._predictor = self._predictor, None
        if predictor is not None:
            await predictor.close()
