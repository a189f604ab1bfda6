"""Avro wire format: fastavro on the hot path, schemas read from ``schemas/*.avsc``."""

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
}


class DecodeError(ValueError):
    """The bytes are not a valid record of the expected schema."""


def schema_dir() -> Path:
    """Where the .avsc files are: the source tree, or the installed data files."""
    candidates = [
        Path(__file__).resolve().parent.parent / "schemas",
        Path(sys.prefix) / "share" / "clipstream" / "schemas",
    ]
    for path in candidates:
        if (path / "query.avsc").is_file():
            return path
    raise FileNotFoundError(f"Avro schemas not found in any of {candidates}")


def schema_json(kind: str) -> dict[str, Any]:
    return json.loads((schema_dir() / SCHEMA_FILES[kind]).read_text())


@cache
def parsed(kind: str) -> Any:
    return fastavro.parse_schema(schema_json(kind))


def encode(kind: str, record: dict[str, Any]) -> bytes:
    """Avro binary of one record (no container, no framing)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed(kind), record)
    return buf.getvalue()


def decode(kind: str, data: bytes | None) -> dict[str, Any]:
    """Decode one record; any malformed input raises DecodeError with the reason."""
    if not data:
        raise DecodeError(f"empty message where a {kind} record was expected")
    buf = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(buf, parsed(kind), None)
    except Exception as exc:  # fastavro raises many types on garbage input
        raise DecodeError(f"not a valid Avro {kind}: {type(exc).__name__}: {exc}") from None
    if buf.tell() != len(data):
        raise DecodeError(
            f"not a valid Avro {kind}: {len(data) - buf.tell()} trailing bytes after the record"
        )
    return record  # type: ignore[return-value]
