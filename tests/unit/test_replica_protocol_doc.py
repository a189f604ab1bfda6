"""docs/replica-protocol.md stays true: its fingerprint table is that of the schema files,
the codec frames records as the Avro specification's single-object encoding does (checked
against the spec's own test vector), and records framed by release 0.1.0 (fingerprint bytes
reversed) are still read."""

from __future__ import annotations

import re
from pathlib import Path

from clipstream.streams.wire import codec

DOC = Path(__file__).resolve().parents[2] / "docs" / "replica-protocol.md"


def test_the_fingerprint_table_matches_the_schemas() -> None:
    rows = re.findall(
        r"^\s*\| `(\w+)` \| `([\w.]+)` \| `([0-9a-f]{16})` \|$", DOC.read_text(), re.M
    )
    assert len(rows) >= 5, "the fingerprint table of docs/replica-protocol.md went missing"
    for kind, file, hex_ in rows:
        assert codec.SCHEMA_FILES[kind] == file
        assert codec.header(kind)[2:].hex() == hex_, (
            f"{kind}'s schema changed: update its fingerprint in docs/replica-protocol.md"
        )


def test_single_object_encoding_is_the_specs() -> None:
    # the Avro spec's test data: "int" has CRC-64-AVRO 0x7275d51a3f395c8f, and its
    # single-object header is C3 01 then those 8 bytes little-endian
    assert codec.MAGIC + codec.fingerprint("int") == bytes.fromhex("c3018f5c393f1ad57572")


def test_records_framed_by_release_0_1_0_are_still_read() -> None:
    record = {
        "digest": "d" * 64,
        "index": 0,
        "count": 1,
        "size": 2,
        "chunk_sha256": "c" * 64,
        "data": b"ab",
    }
    data = codec.encode("ArtifactChunk", record)
    reversed_header = codec.MAGIC + data[2:10][::-1]
    assert codec.decode("ArtifactChunk", reversed_header + data[10:]) == record
    assert codec.kind_of(reversed_header, ("Query", "ArtifactChunk")) == "ArtifactChunk"
