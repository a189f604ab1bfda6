"""Property tests of the Avro codec: whatever bytes arrive, decoding either returns a record
of the expected kind or raises DecodeError with a reason; it never raises anything else."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipstream.streams.wire import codec
from tests.unit.fuzz_counts import report_inputs, tried

pytestmark = pytest.mark.usefixtures("report_inputs")
__all__ = ["report_inputs"]

KINDS = tuple(codec.SCHEMA_FILES)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

doubles = st.floats(allow_nan=True, allow_infinity=True, width=64)
ids = st.text(max_size=40)
longs = st.integers(-(2**63), 2**63 - 1)


def queries() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {
            "query_id": ids,
            "app": ids,
            "user": st.none() | ids,
            "features": st.lists(doubles, max_size=300),
            "raw": st.none() | st.binary(max_size=200),
            "text": st.none() | st.text(max_size=200),
            "sent_at_us": longs,
            "deadline_ms": st.none() | st.integers(-(2**31), 2**31 - 1),
        }
    )


def feedbacks() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {
            "query_id": ids,
            "app": ids,
            "user": st.none() | ids,
            "label": st.none() | ids,
            "reward": st.none() | doubles,
            "sent_at_us": longs,
        }
    )


def decode_or_reason(kind: str, data: bytes) -> dict | str:
    try:
        return codec.decode(kind, data)
    except codec.DecodeError as exc:
        assert str(exc), "a DecodeError must say why"
        return str(exc)


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=2000))
def test_random_bytes_decode_or_give_a_reason(kind: str, data: bytes) -> None:
    tried("random bytes")
    out = decode_or_reason(kind, data)
    if isinstance(out, dict):  # only possible with a valid header
        assert data[:2] == codec.MAGIC


@FUZZ
@given(kind=st.sampled_from(KINDS), body=st.binary(max_size=2000))
def test_random_body_behind_a_valid_header_decodes_or_gives_a_reason(
    kind: str, body: bytes
) -> None:
    """The interesting case: the bytes reach fastavro's reader."""
    tried("random Avro body")
    decode_or_reason(kind, codec.header(kind) + body)


@FUZZ
@given(record=queries(), cut=st.integers(min_value=0))
def test_truncated_queries_are_rejected(record: dict, cut: int) -> None:
    tried("truncated Query")
    data = codec.encode("Query", record)
    cut %= len(data)  # strictly shorter than the record
    out = decode_or_reason("Query", data[:cut])
    assert isinstance(out, str), f"a {cut}/{len(data)}-byte prefix decoded as {out}"


@FUZZ
@given(record=queries())
def test_queries_round_trip_including_nan_and_inf(record: dict) -> None:
    tried("Query round trip")
    back = codec.decode("Query", codec.encode("Query", record))
    assert len(back["features"]) == len(record["features"])
    for a, b in zip(back["features"], record["features"], strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == b
    assert {k: v for k, v in back.items() if k != "features"} == {
        k: v for k, v in record.items() if k != "features"
    }


@FUZZ
@given(record=feedbacks(), extra=st.binary(min_size=1, max_size=20))
def test_wrong_schema_and_trailing_bytes_are_rejected(record: dict, extra: bytes) -> None:
    tried("wrong schema or trailing bytes")
    data = codec.encode("Feedback", record)
    reason = decode_or_reason("Query", data)
    assert isinstance(reason, str) and "unknown schema" in reason
    reason = decode_or_reason("Feedback", data + extra)
    assert isinstance(reason, str) and "trailing bytes" in reason


@FUZZ
@given(record=queries(), flips=st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flipped_queries_decode_or_give_a_reason(record: dict, flips: list[int]) -> None:
    tried("bit-flipped Query")
    data = bytearray(codec.encode("Query", record))
    for flip in flips:
        data[10 + flip % (len(data) - 10)] ^= 1 << (flip % 8)
    decode_or_reason("Query", bytes(data))
