"""Property tests of the worker's query path and feedback agent, driven in-process.

Whatever mix of queries, garbage and malformed model answers arrives, every message is
acknowledged once, every decodable query id gets exactly one prediction, every undecodable
message gets a dead-letter record carrying its bytes, nothing stays pending, and the
pipeline's memory stays within its configured bounds."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from models.registry import Registry
from streams import codec, topics
from streams.app import Worker
from streams.config import Settings
from streams.pipeline import MAX_DEADLINE_MS, DictStateStore, Pipeline, RawQuery, now_us
from tests.unit.fuzz_counts import report_inputs, tried
from tests.unit.test_pipeline import RecordingProducer, make_registry, result_for

pytestmark = pytest.mark.usefixtures("report_inputs")
__all__ = ["report_inputs"]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# far enough ahead that every deadline a query may ask for has passed
LATER_US = (MAX_DEADLINE_MS + 120_000) * 1000

doubles = st.floats(allow_nan=True, allow_infinity=True, width=64)
apps = st.sampled_from(["app", "open", "nope", ""]) | st.text(max_size=8).map(lambda s: "fuzz-" + s)


def registry() -> Registry:
    """EXP4 app ``app`` over m1, m2 (3 features); app ``open`` over m3 with no known input
    dimension, so rows of any width reach the batcher."""
    reg = make_registry("EXP4", ("m1", "m2", "m3"))
    reg.apps["app"]["models"] = ["m1", "m2"]
    m3 = reg.models["m3"]
    m3["versions"][0]["input_dim"] = None
    reg.apps["open"] = {**reg.apps["app"], "models": ["m3"], "policy": "SINGLE", "input_dim": None}
    return reg


def make_pipeline(**settings: Any) -> tuple[Pipeline, RecordingProducer]:
    producer = RecordingProducer()
    pipe = Pipeline(
        Settings(bootstrap="unused:1", **settings),
        registry(),
        producer,
        DictStateStore(),
        rng=np.random.default_rng(0),
    )
    return pipe, producer


query_records = st.fixed_dictionaries(
    {
        "query_id": st.text(max_size=6),
        "app": apps,
        "user": st.none() | st.text(max_size=5),
        "features": st.one_of(
            st.lists(doubles, min_size=3, max_size=3),
            st.lists(doubles, max_size=8),
            st.integers(1000, 3000).map(lambda n: [1.0] * n),  # oversized
        ),
        "raw": st.none() | st.binary(max_size=20),
        "text": st.none() | st.text(max_size=20),
        "sent_at_us": st.integers(-(2**63), 2**63 - 1) | st.just(0) | st.just(-1),
        "deadline_ms": st.none() | st.integers(-(2**31), 2**31 - 1) | st.integers(1, 200),
    }
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["query", "query", "query", "bytes", "truncated", "other"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "other":  # a valid record of another kind on the queries topic
        return codec.encode(
            "Feedback",
            {"query_id": "x", "app": "app", "user": None, "label": "1", "reward": None},
        )
    data = codec.encode("Query", draw(query_records))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


ANSWER_MODES = ["ok", "ok", "ok", "silent", "bytes", "short labels", "bad scores", "stray"]


def play_replicas(pipe: Pipeline, producer: RecordingProducer, modes: list[str]) -> int:
    """Answer every batch sent so far, each in one of ``ANSWER_MODES``; returns how many."""
    requests = [s for s in producer.sent if s[0].endswith(".requests")]
    producer.sent = [s for s in producer.sent if not s[0].endswith(".requests")]
    for i, (_, value, _, _) in enumerate(requests):
        batch = codec.decode("ModelBatch", value)
        n = batch["rows"]
        assert len(batch["inputs"]) == 8 * n * batch["cols"]  # a well-formed matrix
        mode = modes[i % len(modes)] if modes else "ok"
        result = result_for(batch)
        if mode == "silent":
            continue
        if mode == "bytes":
            pipe.on_result(b"\xc3\x01garbage" + value[:7], 0, i)
            continue
        if mode == "short labels":
            result["labels"] = result["labels"][:-1]
        elif mode == "bad scores":
            result["scores"] = result["scores"][:-3]
        elif mode == "stray":
            result["model"] = "fuzz-not-asked"
        pipe.on_result(codec.encode("ModelBatchResult", result), batch["reply_partition"], i)
    return len(requests)


def run(pipe: Pipeline, producer: RecordingProducer, values: list[bytes], modes: list[str]):
    acks: Counter[int] = Counter()
    start = now_us()
    raws = [RawQuery(v, b"k", i % 4, i, lambda i=i: acks.update([i])) for i, v in enumerate(values)]
    pipe.on_queries(raws, start)
    for _ in range(3):  # batches left waiting go out as slots free up
        play_replicas(pipe, producer, modes)
        pipe.tick(now_us())
    pipe.tick(start + LATER_US)
    play_replicas(pipe, producer, modes)  # answers after the deadline are dropped
    pipe.tick(start + LATER_US)
    producer.poll(0)
    return acks


def check_outcomes(values: list[bytes], producer: RecordingProducer, acks: Counter) -> None:
    assert acks == Counter(range(len(values))), "every message is acknowledged exactly once"
    predictions = Counter(p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction"))
    letters = producer.on(topics.DEADLETTER, "DeadLetter")
    decoded_ids = set()
    for value in values:
        try:
            decoded_ids.add(codec.decode("Query", value)["query_id"])
        except codec.DecodeError:
            assert any(d["value"] == value and d["reason"] for d in letters), value
    assert set(predictions) == decoded_ids
    assert all(n == 1 for n in predictions.values()), "one prediction per query id"
    assert all(d["reason"] for d in letters)


@FUZZ
@given(
    values=st.lists(messages(), min_size=1, max_size=30),
    modes=st.lists(st.sampled_from(ANSWER_MODES), max_size=4),
)
def test_every_message_gets_one_outcome_and_nothing_stays_pending(values, modes) -> None:
    tried("queries topic messages", len(values))
    pipe, producer = make_pipeline()
    acks = run(pipe, producer, values, modes)
    check_outcomes(values, producer, acks)
    assert not pipe.pending and not pipe._deadlines
    assert all(b.pending == 0 for b in pipe.batchers.values())
    # and it keeps serving: a good query afterwards gets a model answer
    producer.sent.clear()
    pipe.on_queries([RawQuery(_good_query("after"), b"app", 0, 10_000)])
    pipe.tick(now_us() + 5_000)  # its batch window ran out (slots may still be held)
    play_replicas(pipe, producer, ["ok"])
    (after,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert after["query_id"] == "after" and after["label"] == "1" and not after["default"]


def _good_query(qid: str, app: str = "app") -> bytes:
    return codec.encode(
        "Query",
        {
            "query_id": qid,
            "app": app,
            "user": None,
            "features": [1.0, 2.0, 3.0],
            "raw": None,
            "text": None,
            "sent_at_us": now_us(),
            # long: the machine may be slow; expiry is forced with tick(LATER_US)
            "deadline_ms": 60_000,
        },
    )


def test_memory_stays_bounded_over_a_long_bad_stream() -> None:
    """Many thousands of inputs, a third of them garbage: the pipeline's remembered ids,
    cache and metrics label sets stay within their bounds."""
    rng = np.random.default_rng(7)
    pipe, producer = make_pipeline(answer_memory=500, cache_size=200)
    total = 0
    for round_ in range(20):
        values = []
        for i in range(300):
            r = rng.random()
            if r < 0.33:
                values.append(rng.bytes(int(rng.integers(0, 80))))
            elif r < 0.5:
                values.append(_good_query(f"u{round_}-{i}", app=f"fuzz-{round_}-{i}"))
            else:
                q = _good_query(f"q{round_}-{i}")
                values.append(q[: len(q) - 1] if r < 0.55 else q)
        total += len(values)
        run(pipe, producer, values, ["ok", "silent", "stray"])
        producer.sent.clear()  # what a broker would have taken
        assert not pipe.pending
        assert len(pipe.emitted) <= 500 and len(pipe.memory) <= 500
        assert len(pipe.cache._items) <= 200
    tried("long-run messages", total)
    labels = {
        s.labels.get("app")
        for metric in REGISTRY.collect()
        if metric.name.startswith("clipstream_")
        for s in metric.samples
    }
    assert not {a for a in labels if a and a.startswith("fuzz-")}, "unknown apps share a label"


# -- feedback ------------------------------------------------------------------------------


def feedback_worker() -> tuple[Any, Pipeline, RecordingProducer]:
    """The state a Worker's feedback agent touches, without Faust: the pipeline, the state
    store and a dict standing in for the table."""
    pipe, producer = make_pipeline()
    states = DictStateStore()
    pipe.states = states
    worker = SimpleNamespace(pipeline=pipe, states=SimpleNamespace(cache={}), table={})
    worker.states.state_for = states.state_for
    worker.install_snapshot = lambda snap: Worker.install_snapshot(worker, snap)
    return worker, pipe, producer


feedback_records = st.fixed_dictionaries(
    {
        "query_id": st.sampled_from(["known", "unknown"]) | st.text(max_size=5),
        "app": apps,
        "user": st.none(),
        "label": st.none() | st.sampled_from(["0", "1"]) | st.text(max_size=3),
        "reward": st.none() | st.floats(allow_nan=True, allow_infinity=True),
        "sent_at_us": st.integers(0, 2**40),
    }
)


@st.composite
def feedback_messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["feedback", "feedback", "bytes", "snapshot", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "snapshot":
        return codec.encode(
            "SelectionSnapshot",
            {
                "key": "app",
                "app": "app",
                "state": draw(st.sampled_from(["{}", "[]", "null", "5", "{bad json"])),
                "source": "fuzz",
                "at_us": 0,
            },
        )
    data = codec.encode("Feedback", draw(feedback_records))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


@FUZZ
@given(values=st.lists(feedback_messages(), min_size=1, max_size=20))
def test_feedback_is_applied_or_dead_lettered_and_weights_stay_finite(values) -> None:
    tried("feedback messages", len(values))
    worker, pipe, producer = feedback_worker()
    pipe.on_queries([RawQuery(_good_query("known"), b"app", 0, 0)])
    play_replicas(pipe, producer, ["ok"])
    producer.sent.clear()
    for i, value in enumerate(values):
        message = SimpleNamespace(value=value, key=b"app", partition=0, offset=i)
        Worker.on_feedback(worker, message)
    letters = producer.on(topics.DEADLETTER, "DeadLetter")
    assert all(d["reason"] and d["stage"] == "feedback" for d in letters)
    applied = 0
    for value in values:
        try:
            fb = codec.decode("Feedback", value)
        except codec.DecodeError:
            assert any(d["value"] == value for d in letters)
            continue
        good = (
            fb["query_id"] == "known"
            and fb["app"] in ("app",)
            and (fb["label"] is not None or (fb["reward"] is not None and 0 <= fb["reward"] <= 1))
        )
        dead = [d for d in letters if d["value"] == value]
        assert good != bool(dead), (fb, dead)
        if fb["query_id"] != "known" and dead:
            assert "unknown or expired query" in dead[0]["reason"]
        applied += good
    state = worker.states.state_for("app", pipe.registry.app("app"))
    weights = list(state.weights().values())
    assert all(math.isfinite(w) for w in weights) and sum(weights) == pytest.approx(1.0)
