"""The Faust integration's records and codec without a broker: Query, Prediction and
Feedback records carry the schemas' fields, a record Faust serializes is a wire record
clipstream's codec decodes, wire bytes the worker writes come back to Faust as records,
anything else is refused, and Faust's partitioner puts a query id where the SDK's does."""

from __future__ import annotations

import faust
import pytest
from aiokafka.partitioner import DefaultPartitioner
from faust.exceptions import ValueDecodeError

from clipstream.streams.integrations.faust import (
    CODEC,
    Clipstream,
    Feedback,
    ModelAnswer,
    Prediction,
    Query,
    settings_for,
)
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.partitioner import partition

APP = faust.App("test-faust-codec", broker="kafka://127.0.0.1:1", loop=None)


def fields_of(schema: dict) -> dict[str, bool]:
    """field name -> whether it has a default"""
    return {f["name"]: "default" in f for f in schema["fields"]}


@pytest.mark.parametrize("kind", ["Query", "Prediction", "Feedback"])
def test_each_record_has_its_schemas_fields(kind: str) -> None:
    record = {"Query": Query, "Prediction": Prediction, "Feedback": Feedback}[kind]
    schema = codec.schema_json(kind)
    assert list(record._options.fields) == list(fields_of(schema))
    required = {name for name, d in record._options.descriptors.items() if d.required}
    # schema-required fields stay required, but sent_at_us (stamped on sending)
    assert required == {n for n, has in fields_of(schema).items() if not has} - {"sent_at_us"}
    if kind == "Prediction":
        (answers,) = [f for f in schema["fields"] if f["name"] == "answers"]
        assert list(ModelAnswer._options.fields) == list(fields_of(answers["type"]["items"]))


def test_a_query_faust_sends_is_a_wire_query() -> None:
    query = Query(query_id="q1", app="digits", user="u1", features=[1.0, 2.5], deadline_ms=50)
    before = now_us()
    data = APP.serializers.dumps_value(Query, query, serializer=CODEC)
    assert data is not None and data[:2] == codec.MAGIC
    decoded = codec.decode("Query", data)
    assert before <= decoded.pop("sent_at_us") <= now_us()  # 0 stamped when encoded
    assert decoded == {
        "query_id": "q1",
        "app": "digits",
        "user": "u1",
        "features": [1.0, 2.5],
        "raw": None,
        "text": None,
        "deadline_ms": 50,
    }
    # a given send time is kept, and the record's own dumps() says the same
    stamped = Query(query_id="q2", app="digits", text="hi", sent_at_us=123)
    assert codec.decode("Query", stamped.dumps())["sent_at_us"] == 123
    assert APP.serializers.loads_value(Query, stamped.dumps(), serializer=CODEC) == stamped


def test_a_wire_prediction_reads_as_a_prediction_record() -> None:
    wire = {
        "query_id": "q1",
        "app": "digits",
        "user": None,
        "label": "7",
        "score": 0.9,
        "models": ["digits-logreg@1"],
        "answers": [
            {
                "model": "digits-logreg",
                "version": 1,
                "label": "7",
                "score": 0.9,
                "prob": 1.0,
                "error": None,
                "cache_hit": False,
            }
        ],
        "cache_hit": False,
        "default": False,
        "error": None,
        "sent_at_us": 10,
        "emitted_at_us": 20,
        "worker_us": 5,
    }
    data = codec.encode("Prediction", wire)
    got = APP.serializers.loads_value(Prediction, data, serializer=CODEC)
    assert isinstance(got, Prediction)
    assert (got.query_id, got.label, got.score, got.default) == ("q1", "7", 0.9, False)
    assert isinstance(got.answers[0], ModelAnswer) and got.answers[0].model == "digits-logreg"
    # untyped topics get the record too (the fingerprint tells the kind)
    assert APP.serializers.loads_value(None, data, serializer=CODEC) == got
    # and back: the same bytes
    assert APP.serializers.dumps_value(Prediction, got, serializer=CODEC) == data


def test_feedback_round_trips_and_a_mapping_with_its_namespace_encodes() -> None:
    feedback = Feedback(query_id="q1", app="digits", user="u1", label="3", sent_at_us=7)
    data = feedback.dumps()
    assert codec.decode("Feedback", data) == {
        "query_id": "q1",
        "app": "digits",
        "user": "u1",
        "label": "3",
        "reward": None,
        "sent_at_us": 7,
    }
    assert APP.serializers.loads_value(Feedback, data, serializer=CODEC) == feedback
    as_mapping = feedback.to_representation()  # what Faust hands a codec
    assert "__faust" in as_mapping
    assert APP.serializers.dumps_value(None, as_mapping, serializer=CODEC) == data


def test_anything_else_is_refused() -> None:
    with pytest.raises(TypeError, match="namespace"):
        APP.serializers.dumps_value(None, {"query_id": "q", "app": "a"}, serializer=CODEC)
    with pytest.raises(TypeError, match="records, not int"):
        APP.serializers.dumps_value(None, 3, serializer=CODEC)
    dead_letter = codec.encode(
        "DeadLetter",
        {
            "source_topic": "t",
            "partition": 0,
            "offset": 0,
            "key": None,
            "value": None,
            "reason": "r",
            "stage": "intake",
            "query_id": None,
            "at_us": 1,
        },
    )
    for data in (b'{"query_id": "q"}', dead_letter, codec.header("Query")):
        with pytest.raises(ValueDecodeError):
            APP.serializers.loads_value(Query, data, serializer=CODEC)
    truncated = Query(query_id="q", app="a", sent_at_us=1).dumps()[:-3]
    with pytest.raises(ValueDecodeError, match="not a valid Avro Query"):
        APP.serializers.loads_value(Query, truncated, serializer=CODEC)


def test_faust_puts_a_query_id_on_the_sdks_partition() -> None:
    # Faust's aiokafka producer partitions with aiokafka's DefaultPartitioner unless the
    # app sets producer_partitioner; the SDK keys by the query id's UTF-8 bytes
    assert APP.conf.producer_partitioner is None
    partitioner = DefaultPartitioner()
    for i in range(500):
        key = f"query-{i}-é".encode()
        for partitions in (1, 3, 4, 12):
            assert partitioner(key, list(range(partitions)), []) == partition(key, partitions)


def test_the_helper_uses_the_apps_broker_and_the_wire_topics() -> None:
    app = faust.App("test-faust-helper", broker="kafka://h1:9093;kafka://h2")
    assert settings_for(app, Settings()).bootstrap == "h1:9093,h2:9092"
    assert settings_for(app, Settings(bootstrap="b:1", partitions=8)).bootstrap == "b:1"
    clip = Clipstream(app, Settings(bootstrap="b:1"))
    assert clip.settings.bootstrap == "b:1"
    assert [t.get_topic_name() for t in (clip.queries, clip.predictions, clip.feedback)] == [
        topics.QUERIES,
        topics.PREDICTIONS,
        topics.FEEDBACK,
    ]
    assert clip.predictions.value_type is Prediction
    assert clip.feedback.value_serializer == CODEC
