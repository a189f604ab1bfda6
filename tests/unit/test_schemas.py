"""Every schema parses with the avro package, round-trips through the fastavro codec, and
stays backward compatible with the last release (new readers read old data)."""

from __future__ import annotations

import json

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from clipstream.streams.wire import codec

PREVIOUS = codec.HISTORY / "0.1.0"
#: record kinds the previous release did not have
NEW_SINCE_PREVIOUS = {"Observation", "ObservationBatch", "ArtifactChunk"}


@pytest.mark.parametrize("kind", sorted(codec.SCHEMA_FILES))
def test_schema_parses_with_avro(kind: str) -> None:
    # with the records it names from other files inlined, as the codec reads it
    parsed = avro.schema.parse(json.dumps(codec.schema_json(kind)))
    assert parsed.name == kind


def test_a_record_another_file_defines_is_inlined_once() -> None:
    batch = codec.schema_json("ObservationBatch")
    items = batch["fields"][0]["type"]["items"]
    assert items == codec.schema_json("Observation")
    # the batch's fingerprint changes with the Observation it holds
    other = json.loads(json.dumps(batch))
    other["fields"][0]["type"]["items"]["fields"].pop()
    assert codec.fingerprint(other) != codec.fingerprint(batch)


@pytest.mark.parametrize("kind", sorted(codec.SCHEMA_FILES))
def test_schema_is_backward_compatible_with_previous_release(kind: str) -> None:
    file = codec.SCHEMA_FILES[kind]
    if not (PREVIOUS / file).is_file():
        assert kind in NEW_SINCE_PREVIOUS, f"{kind} has no schema in {PREVIOUS}"
        return  # no data of an earlier release to read
    reader = avro.schema.parse((codec.schema_dir() / file).read_text())
    writer = avro.schema.parse((PREVIOUS / file).read_text())
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
    assert result.compatibility is SchemaCompatibilityType.compatible, result.messages


def test_compatibility_check_catches_a_breaking_change() -> None:
    # The check above must be able to fail: a new required field without a default breaks
    # readers of old data.
    old = json.loads((PREVIOUS / "query.avsc").read_text())
    new = json.loads(json.dumps(old))
    new["fields"].append({"name": "tenant", "type": "string"})
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(new)), avro.schema.parse(json.dumps(old))
    )
    assert result.compatibility is SchemaCompatibilityType.incompatible


def test_fastavro_round_trip_and_garbage_rejected() -> None:
    record = {
        "query_id": "q1",
        "app": "a",
        "user": None,
        "features": [1.0, 2.5],
        "raw": None,
        "text": None,
        "sent_at_us": 123,
        "deadline_ms": 50,
    }
    data = codec.encode("Query", record)
    assert codec.decode("Query", data) == record
    with pytest.raises(codec.DecodeError, match="trailing bytes"):
        codec.decode("Query", data + b"\x00\x01")
    with pytest.raises(codec.DecodeError, match="empty"):
        codec.decode("Query", b"")
    with pytest.raises(codec.DecodeError):
        codec.decode("Query", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")


def test_records_from_an_older_schema_are_read_by_schema_resolution(tmp_path, monkeypatch):
    # an "earlier release" whose Query had no deadline_ms field
    old = codec.schema_json("Query")
    old["fields"] = [f for f in old["fields"] if f["name"] != "deadline_ms"]
    (tmp_path / "0.0.9").mkdir()
    (tmp_path / "0.0.9" / "query.avsc").write_text(json.dumps(old))
    monkeypatch.setattr(codec, "HISTORY", tmp_path)
    codec.writers.cache_clear()
    try:
        import io

        import fastavro

        buf = io.BytesIO()
        buf.write(codec.MAGIC + codec.fingerprint(old))
        fastavro.schemaless_writer(
            buf,
            fastavro.parse_schema(old),
            {
                "query_id": "q",
                "app": "a",
                "user": None,
                "features": [1.0],
                "raw": None,
                "text": None,
                "sent_at_us": 5,
            },
        )
        record = codec.decode("Query", buf.getvalue())
        assert record["query_id"] == "q" and record["deadline_ms"] is None
        assert record["sent_at_us"] == 5
    finally:
        codec.writers.cache_clear()


def test_unknown_writer_schema_is_refused_with_its_fingerprint():
    data = codec.MAGIC + b"\x01" * 8 + b"\x02q"
    with pytest.raises(codec.DecodeError, match="unknown schema"):
        codec.decode("Query", data)
