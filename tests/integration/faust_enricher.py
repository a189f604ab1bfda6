"""A Faust app for tests/integration/test_faust_app.py: `python faust_enricher.py worker`.

An agent reads the app's own events (JSON), awaits each one's prediction through
``Clipstream.predict`` (or, for events marked ``direct``, sends a ``Query`` record to
clipstream.queries through Faust's producer and lets a second agent, reading
clipstream.predictions as a Faust topic, pick up the answer), writes the enriched event to
the output topic and sends feedback: through the SDK for odd ids, as a ``Feedback`` record
on the Faust topic for even ones. Configured by the environment (see below).
"""

from __future__ import annotations

import os

import faust

from clipstream.streams.integrations.faust import Clipstream, Feedback, Prediction, Query

BOOTSTRAP = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
APP = os.environ["FAUST_TEST_CLIPSTREAM_APP"]  # the clipstream app asked
EVENTS = os.environ["FAUST_TEST_EVENTS"]
ENRICHED = os.environ["FAUST_TEST_ENRICHED"]
DIRECT = os.environ["FAUST_TEST_DIRECT"]  # direct queries' predictions, as Faust read them
DIRECT_PREFIX = "faust-direct-"

app = faust.App(
    os.environ.get("FAUST_TEST_ID", "faust-enricher"),
    broker=f"kafka://{BOOTSTRAP}",
    store="memory://",
    topic_partitions=4,
    # the test creates every topic, with its partition count; no leader topic is needed
    topic_allow_declare=False,
    topic_disable_leader=True,
    broker_session_timeout=10,
    consumer_auto_offset_reset="earliest",
    datadir=os.environ["FAUST_TEST_DATADIR"],  # not the working directory
)
clip = Clipstream(app)


class Event(faust.Record, serializer="json"):
    id: str
    features: list[float]
    truth: str
    user: str | None = None
    direct: bool = False


class Enriched(faust.Record, serializer="json"):
    id: str
    query_id: str
    truth: str
    user: str | None
    label: str | None
    default: bool
    models: list[str]


events = app.topic(EVENTS, key_type=str, value_type=Event, key_serializer="raw")
enriched = app.topic(ENRICHED, key_type=str, value_type=Enriched, key_serializer="raw")
direct = app.topic(
    DIRECT, key_type=str, value_type=Prediction, key_serializer="raw", value_serializer="clipstream"
)


@app.agent(events, concurrency=8)
async def enrich(stream: faust.StreamT[Event]) -> None:
    async for event in stream:
        if event.direct:
            qid = f"{DIRECT_PREFIX}{event.id}"
            query = Query(
                query_id=qid, app=APP, user=event.user, features=event.features, deadline_ms=20_000
            )
            await clip.queries.send(key=qid, value=query)
            continue
        qid = f"faust-{event.id}"
        prediction = await clip.predict(
            APP, event.features, user=event.user, query_id=qid, deadline_ms=20_000, timeout=60
        )
        out = Enriched(
            id=event.id,
            query_id=prediction.query_id,
            truth=event.truth,
            user=prediction.user,
            label=prediction.label,
            default=prediction.default,
            models=list(prediction.models),
        )
        await enriched.send(key=event.id, value=out)
        if int(event.id) % 2:
            await clip.send_feedback(qid, APP, label=event.truth, user=event.user)
        else:
            feedback = Feedback(query_id=qid, app=APP, user=event.user, label=event.truth)
            await clip.feedback.send(key=qid, value=feedback)


@app.agent(clip.predictions)
async def direct_answers(stream: faust.StreamT[Prediction]) -> None:
    async for key, prediction in stream.items():
        if prediction.query_id.startswith(DIRECT_PREFIX):
            assert key == prediction.query_id
            await direct.send(key=key, value=prediction)


if __name__ == "__main__":
    app.main()
