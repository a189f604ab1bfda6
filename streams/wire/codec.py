"""Avro wire format: fastavro on the hot path, schemas read from ``schemas/*.avsc``.

Every message is Avro single-object encoded (the Avro spec's ``C3 01`` marker, then the
8-byte CRC-64-AVRO fingerprint of the writer's schema, then the body), so a reader always
knows which schema wrote the bytes. A record written by an older release is read through
Avro schema resolution with that release's schema as the writer schema; its schemas are
kept in ``streams/wire/schema_history/<release>/``. Without this, a reader whose schema gained
a field would misread every older record (the bytes carry no field names).
"""

from __future__ import annotations

import io
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import fastavro

#: record kind -> file name in schemas/
SCHEMA_FILES = {
    "Query": "query.avsc",
    "Prediction": "prediction.avsc",
    "Feedback": "feedback.avsc",
    "ModelBatch": "model_batch.avsc",
    "ModelBatchResult": "model_batch_result.avsc",
    "DeadLetter": "dead_letter.avsc",
    "ControlRecord": "control_record.avsc",
    "SelectionSnapshot": "selection_snapshot.avsc",
    "Observation": "observation.avsc",
    "ObservationBatch": "observation_batch.avsc",
    "ArtifactChunk": "artifact_chunk.avsc",
}


class DecodeError(ValueError):
    """The bytes are not a valid record of the expected schema."""


def schema_dir() -> Path:
    """Where the .avsc files are: the source tree, or the installed data files."""
    candidates = [
        Path(__file__).resolve().parents[2] / "schemas",
        Path(sys.prefix) / "share" / "clipstream" / "schemas",
    ]
    for path in candidates:
        if (path / "query.avsc").is_file():
            return path
    raise FileNotFoundError(f"Avro schemas not found in any of {candidates}")


NAMESPACE = "clipstream"


def schema_json(kind: str) -> dict[str, Any]:
    """The schema of ``kind``, whole: a record another file defines is named there by its
    full name (as ``"items": "clipstream.Observation"``), and is inlined here where it is
    first used, so each record type is written in one file and every reader (fastavro, the
    avro package, the fingerprint) sees one self-contained schema."""
    schema = json.loads((schema_dir() / SCHEMA_FILES[kind]).read_text())
    return _inline(schema, {kind})  # type: ignore[no-any-return]


def _inline(node: Any, defined: set[str]) -> Any:
    if isinstance(node, str):
        kind = node.removeprefix(NAMESPACE + ".")
        if kind != node and kind in SCHEMA_FILES and kind not in defined:
            defined.add(kind)
            return _inline(json.loads((schema_dir() / SCHEMA_FILES[kind]).read_text()), defined)
        return node
    if isinstance(node, list):
        return [_inline(each, defined) for each in node]
    if isinstance(node, dict):
        return {
            k: _inline(v, defined) if k in ("type", "items", "values", "fields") else v
            for k, v in node.items()
        }
    return node


MAGIC = b"\xc3\x01"
HISTORY = Path(__file__).resolve().parent / "schema_history"


@cache
def parsed(kind: str) -> Any:
    return fastavro.parse_schema(schema_json(kind))


def fingerprint(schema: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the schema's canonical form, little-endian, as the spec frames it
    (fastavro's hex string already lists the bytes in that order)."""
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


@cache
def header(kind: str) -> bytes:
    return MAGIC + fingerprint(schema_json(kind))


@cache
def writers(kind: str) -> dict[bytes, Any]:
    """Fingerprint -> parsed writer schema, for this release and every earlier one.

    Releases up to 0.1.0 wrote the fingerprint's bytes in reverse (big-endian) order; their
    records are still read."""
    current = fingerprint(schema_json(kind))
    found = {current: parsed(kind), current[::-1]: parsed(kind)}
    for release in sorted(HISTORY.glob("*")):
        path = release / SCHEMA_FILES[kind]
        if path.is_file():
            schema = json.loads(path.read_text())
            for framed in (fingerprint(schema), fingerprint(schema)[::-1]):
                found.setdefault(framed, fastavro.parse_schema(schema))
    return found


def kind_of(data: bytes | None, kinds: tuple[str, ...]) -> str | None:
    """Which of ``kinds`` wrote these bytes (from the fingerprint), or None."""
    if not data or data[:2] != MAGIC:
        return None
    for kind in kinds:
        if data[2:10] in writers(kind):
            return kind
    return None


def encode(kind: str, record: dict[str, Any]) -> bytes:
    """One record, single-object encoded."""
    buf = io.BytesIO()
    buf.write(header(kind))
    fastavro.schemaless_writer(buf, parsed(kind), record)
    return buf.getvalue()


def decode(kind: str, data: bytes | None) -> dict[str, Any]:
    """Decode one record; any malformed input raises DecodeError with the reason."""
    if not data:
        raise DecodeError(f"empty message where a {kind} record was expected")
    if data[:2] != MAGIC or len(data) < 10:
        raise DecodeError(f"not a valid Avro {kind}: no single-object encoding header")
    writer = writers(kind).get(data[2:10])
    if writer is None:
        raise DecodeError(
            f"not a valid Avro {kind}: written with an unknown schema "
            f"(fingerprint {data[2:10].hex()})"
        )
    buf = io.BytesIO(data)
    buf.seek(10)
    try:
        record = fastavro.schemaless_reader(buf, writer, parsed(kind))
    except Exception as exc:  # fastavro raises many types on garbage input
        raise DecodeError(f"not a valid Avro {kind}: {type(exc).__name__}: {exc}") from None
    if buf.tell() != len(data):
        raise DecodeError(
            f"not a valid Avro {kind}: {len(data) - buf.tell()} trailing bytes after the record"
        )
    return record  # type: ignore[return-value]
