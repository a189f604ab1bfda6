"""Client SDK for applications (confluent-kafka): send queries and feedback, read predictions.

A query and its feedback are both keyed by the query id (with the same partitioner), so
they land on the same partition: the worker that answered a query is the one that joins
its feedback to the answers. Queries of one app thus spread over every partition and
every worker, whoever the user is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.dead_letter import encode_dead_letter
from clipstream.streams.wire.kafka import FETCH_WAIT_MS, consume_ready, produce, watermarks
from clipstream.streams.wire.limits import deadline_problem
from clipstream.streams.wire.sensors import Sensor

log = logging.getLogger("clipstream.sdk")


class SeenIds:
    """Bounded memory of query ids already handed to the app (removes redelivered duplicates)."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0

    def first_time(self, qid: str) -> bool:
        if qid in self._ids:
            self.duplicates += 1
            return False
        self._ids[qid] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


class Client:
    """Produces queries and feedback."""

    def __init__(self, settings: Settings | None = None, **producer_config: Any) -> None:
        self.settings = settings or Settings.from_env()
        self.producer = Producer(
            self.settings.kafka(
                **{
                    "linger.ms": 0,
                    "enable.idempotence": True,
                    "partitioner": "murmur2_random",
                    **producer_config,
                }
            )
        )

    def send_query(
        self,
        app: str,
        features: Sequence[float] = (),
        *,
        user: str | None = None,
        query_id: str | None = None,
        deadline_ms: int | None = None,
        raw: bytes | None = None,
        text: str | None = None,
    ) -> str:
        """Produce one query; returns its id. Raises ValueError for a ``deadline_ms`` the
        worker would reject (outside (0, ``clipstream.streams.wire.limits.MAX_DEADLINE_MS``])."""
        problem = deadline_problem(deadline_ms)
        if problem is not None:
            raise ValueError(problem)
        qid = query_id or uuid.uuid4().hex
        record = {
            "query_id": qid,
            "app": app,
            "user": user,
            "features": [float(x) for x in features],
            "raw": raw,
            "text": text,
            "sent_at_us": now_us(),
            "deadline_ms": deadline_ms,
        }
        self._produce(topics.QUERIES, codec.encode("Query", record), qid.encode())
        return qid

    def send_feedback(
        self,
        query_id: str,
        app: str,
        *,
        label: str | int | None = None,
        reward: float | None = None,
        user: str | None = None,
    ) -> None:
        record = {
            "query_id": query_id,
            "app": app,
            "user": user,
            "label": None if label is None else str(label),
            "reward": reward,
            "sent_at_us": now_us(),
        }
        self._produce(topics.FEEDBACK, codec.encode("Feedback", record), query_id.encode())

    def _produce(self, topic: str, value: bytes, key: bytes) -> None:
        produce(self.producer, topic, value, key)
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        if self.producer.flush(timeout) != 0:
            raise TimeoutError(f"messages not delivered within {timeout}s")


class PredictionReader:
    """Reads clipstream.predictions, each query id once.

    ``from_beginning=False`` starts at the current end of every partition, so only
    predictions produced after construction are seen."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        from_beginning: bool = False,
        group_id: str | None = None,
        sensor: Sensor | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        # hooks, not a metrics library: the SDK needs only confluent-kafka and fastavro
        self.sensor = sensor or Sensor()
        self.consumer = Consumer(
            self.settings.kafka(
                **{
                    "group.id": group_id or f"clipstream-reader-{uuid.uuid4().hex}",
                    "enable.auto.commit": group_id is not None,
                    "auto.offset.reset": "earliest" if from_beginning else "latest",
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                    "enable.partition.eof": False,
                }
            )
        )
        if group_id is None:
            md = self.consumer.list_topics(topics.PREDICTIONS, timeout=30)
            assignment = []
            for p in md.topics[topics.PREDICTIONS].partitions:
                tp = TopicPartition(topics.PREDICTIONS, p)
                # explicit end offsets, resolved now: predictions produced from here on are seen
                low, high = watermarks(self.consumer, tp, 30)
                assignment.append(
                    TopicPartition(topics.PREDICTIONS, p, low if from_beginning else high)
                )
            self.consumer.assign(assignment)
        else:
            self.consumer.subscribe([topics.PREDICTIONS])
        self.seen = SeenIds()
        #: malformed predictions skipped (each also dead-lettered)
        self.malformed = 0
        self._dead_letters: Producer | None = None

    def pause(self) -> None:
        """Stop fetching (a reader with nobody waiting costs the broker and this process
        nothing while paused)."""
        self.consumer.pause(self.consumer.assignment())

    def resume_at_end(self) -> None:
        """Go on from the current end of every partition: predictions produced from here on
        are seen, those produced while paused are skipped."""
        placed = []
        for tp in self.consumer.assignment():
            _, high = watermarks(self.consumer, TopicPartition(tp.topic, tp.partition), 30)
            placed.append(TopicPartition(tp.topic, tp.partition, high))
        self.consumer.assign(placed)
        self.consumer.resume(placed)  # librdkafka keeps a partition's pause across assign()

    def poll(
        self, timeout: float = 0.1, max_records: int = 1000, keys: Container[bytes] | None = None
    ) -> list[dict[str, Any]]:
        """The predictions that arrived, each query id once.

        ``keys``: decode only predictions whose Kafka key (the query id, UTF-8) is in it and
        skip the rest undecoded. A malformed prediction is skipped, counted in
        ``malformed`` and dead-lettered; the rest of the batch is returned as usual."""
        out = []
        for msg in consume_ready(self.consumer, max_records, timeout):
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("predictions topic: %s", error)
                continue
            if keys is not None and msg.key() not in keys:
                continue
            try:
                record = codec.decode("Prediction", msg.value())
            except codec.DecodeError as exc:
                self._dead_letter(msg, str(exc))
                continue
            if self.seen.first_time(record["query_id"]):
                record["received_at_us"] = now_us()
                out.append(record)
        return out

    def _dead_letter(self, msg: Message, reason: str) -> None:
        self.malformed += 1
        self.sensor.on_dead_letter("reader")
        log.warning(
            "skipped a malformed prediction (partition %d, offset %d): %s",
            msg.partition(),
            msg.offset(),
            reason,
        )
        if self._dead_letters is None:
            self._dead_letters = Producer(self.settings.kafka(**{"linger.ms": 0}))
        key = msg.key()
        try:
            query_id = key.decode() if key else None  # predictions are keyed by query id
        except UnicodeDecodeError:
            query_id = None
        record = encode_dead_letter(
            topics.PREDICTIONS,
            msg.partition(),
            msg.offset(),
            key,
            msg.value(),
            reason,
            "reader",
            query_id,
        )
        self._dead_letters.produce(topics.DEADLETTER, record, key)
        self._dead_letters.poll(0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.poll(0.5)

    def close(self) -> None:
        self.consumer.close()
        if self._dead_letters is not None and self._dead_letters.flush(5):
            log.error("dead letters of malformed predictions not delivered within 5 s")


class Predictor:
    """Request/response over Kafka: ``predict()`` sends a query and waits for its answer.

    One background thread reads clipstream.predictions and hands each awaited prediction
    over to whoever waits for its query id: a ``concurrent.futures.Future`` here, an asyncio
    future in ``clipstream.streams.sdk_async.AsyncPredictor`` (which is built on this one).
    A query is forgotten once its prediction came, once ``predict`` timed out, or once the
    caller cancelled the future of ``submit``: ``waiting`` counts the rest."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.client = Client(self.settings)
        self.reader = PredictionReader(self.settings)
        #: query id -> what to call with its prediction (in the reader thread)
        self._waiting: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predictions", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Queries sent whose prediction has neither come nor been given up on."""
        return len(self._waiting)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                records = self.reader.poll(0.1)
            except Exception:  # waiting callers time out; later predictions still resolve
                log.exception("predictions consumer")
                continue
            for record in records:
                with self._lock:
                    hand_over = self._waiting.pop(record["query_id"], None)
                if hand_over is None:
                    continue
                try:
                    hand_over(record)
                except Exception:  # e.g. an asyncio caller's loop closed: not the others' loss
                    log.exception("handing over the prediction of %s", record["query_id"])

    def _send(
        self,
        app: str,
        features: Sequence[float],
        qid: str,
        hand_over: Callable[[dict[str, Any]], None],
        kw: dict[str, Any],
    ) -> None:
        """Wait for ``qid`` (before it is sent, so its answer cannot be missed), then send it.
        ``hand_over`` is called once, in the reader thread, with its prediction."""
        with self._lock:
            if qid in self._waiting:
                raise ValueError(f"query id {qid!r} is already waiting for its prediction")
            self._waiting[qid] = hand_over
        try:
            self.client.send_query(app, features, query_id=qid, **kw)
        except Exception:
            self._forget(qid)
            raise

    def _forget(self, qid: str) -> bool:
        """Stop waiting for ``qid``; False if its prediction was already taken for handing
        over (it is on its way to the caller)."""
        with self._lock:
            return self._waiting.pop(qid, None) is not None

    def submit(self, app: str, features: Sequence[float], **kw: Any) -> Future[dict[str, Any]]:
        """Send a query; the future resolves with its prediction. Cancelling the future
        forgets the query. Arguments as ``Client.send_query``'s."""
        qid = kw.pop("query_id", None) or uuid.uuid4().hex
        future: Future[dict[str, Any]] = Future()
        future.add_done_callback(lambda f: f.cancelled() and self._forget(qid))
        self._send(app, features, qid, partial(_settle, future), kw)
        self.client.producer.flush(5)
        return future

    def predict(
        self, app: str, features: Sequence[float], timeout: float | None = 10.0, **kw: Any
    ) -> dict[str, Any]:
        """Send a query and return its prediction. The worker answers every query by its
        deadline, with the app's default output (``default`` true) when no model could;
        ``TimeoutError`` after ``timeout`` seconds means no answer came at all (no worker
        serves, say): the query is forgotten and a later prediction for it dropped."""
        qid = kw.pop("query_id", None) or uuid.uuid4().hex
        future = self.submit(app, features, query_id=qid, **kw)
        try:
            return future.result(timeout)
        except TimeoutError:
            if self._forget(qid):
                raise
            return future.result(5)  # it came just as the time ran out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.reader.close()
        self.client.flush(5)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(future: Future[dict[str, Any]], record: dict[str, Any]) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled by its caller meanwhile
        future.set_result(record)
