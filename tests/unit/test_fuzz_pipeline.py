"""Property tests of the worker's query path and learning, driven in-process.

Whatever mix of queries, garbage and malformed model answers arrives, every message is
done (its offset committable), every decodable query id gets exactly one prediction, every
undecodable message gets a dead-letter record carrying its bytes, nothing stays pending,
and the pipeline's memory stays within its configured bounds."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from clipstream.models.control.registry import Registry
from clipstream.streams.learning.learner import Learner
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.limits import MAX_DEADLINE_MS
from clipstream.streams.worker.pipeline import Pipeline
from tests.unit import fakes
from tests.unit.fakes import (
    FakeMessage,
    MemoryStore,
    RecordingProducer,
    make_registry,
    result_for,
)
from tests.unit.fuzz_counts import report_inputs, tried

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
    return fakes.make_pipeline(registry(), **settings)


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
            pipe.on_results(
                [FakeMessage(topics.RESPONSES, b"\xc3\x01garbage" + value[:7])], now_us()
            )
            continue
        if mode == "short labels":
            result["labels"] = result["labels"][:-1]
        elif mode == "bad scores":
            result["scores"] = result["scores"][:-3]
        elif mode == "stray":
            result["model"] = "fuzz-not-asked"
        value = codec.encode("ModelBatchResult", result)
        pipe.on_results(
            [FakeMessage(topics.RESPONSES, value, None, batch["reply_partition"], i)], now_us()
        )
    return len(requests)


def run(pipe: Pipeline, producer: RecordingProducer, values: list[bytes], modes: list[str]):
    start = now_us()
    msgs = [FakeMessage(topics.QUERIES, v, b"k", i % 4, i) for i, v in enumerate(values)]
    pipe.on_queries(msgs, start)
    for _ in range(3):  # batches left waiting go out as slots free up
        pipe.tick(now_us())
        play_replicas(pipe, producer, modes)
    pipe.tick(start + LATER_US)
    play_replicas(pipe, producer, modes)  # answers after the deadline are dropped
    pipe.tick(start + LATER_US)
    producer.poll(0)
    return msgs


def check_outcomes(pipe: Pipeline, msgs: list, producer: RecordingProducer) -> None:
    last = {m.partition(): m.offset() for m in msgs}
    done = {p: o for (t, p), o in pipe.offsets.to_commit().items() if t == topics.QUERIES}
    assert done == {p: o + 1 for p, o in last.items()}, "every message is done"
    values = [m.value() for m in msgs]
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
    msgs = run(pipe, producer, values, modes)
    check_outcomes(pipe, msgs, producer)
    assert not pipe.pending and pipe.pending.next_deadline() is None
    assert all(len(q) == 0 for q in pipe.dispatch.queues.values())
    # and it keeps serving: a good query afterwards gets a model answer
    producer.sent.clear()
    pipe.on_queries(
        [FakeMessage(topics.QUERIES, _good_query("after"), b"app", 0, 10_000)], now_us()
    )
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
    pipe, producer = make_pipeline(answer_memory=500, dedup_memory=500, cache_size=200)
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
        assert pipe.pending.heap_size() <= 1024
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
    kind = draw(st.sampled_from(["feedback", "feedback", "bytes", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    data = codec.encode("Feedback", draw(feedback_records))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


@st.composite
def snapshots(draw: st.DrawFn) -> bytes:
    return codec.encode(
        "SelectionSnapshot",
        {
            "key": "app",
            "app": "app",
            "state": draw(st.sampled_from(["{}", "[]", "null", "5", "{bad json"])),
            "source": "fuzz",
            "at_us": 0,
            "observed_offset": draw(st.integers(-1, 10)),
        },
    )


@FUZZ
@given(
    values=st.lists(feedback_messages(), min_size=1, max_size=20),
    bad_snapshots=st.lists(snapshots(), max_size=3),
)
def test_feedback_is_observed_or_dead_lettered_and_weights_stay_finite(
    values, bad_snapshots
) -> None:
    tried("feedback messages", len(values) + len(bad_snapshots))
    pipe, producer = make_pipeline()
    pipe.on_queries([FakeMessage(topics.QUERIES, _good_query("known"), b"app", 0, 0)], now_us())
    pipe.tick(now_us())
    play_replicas(pipe, producer, ["ok"])
    producer.sent.clear()
    msgs = [FakeMessage(topics.FEEDBACK, v, b"app", 0, i) for i, v in enumerate(values)]
    pipe.on_feedback(msgs, now_us())
    producer.poll()
    letters = producer.on(topics.DEADLETTER, "DeadLetter")
    assert all(d["reason"] and d["stage"] == "feedback" for d in letters)
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
        signal = fb["label"] is not None or (fb["reward"] is not None and 0 <= fb["reward"] <= 1)
        ignored = fb["app"] == "open" and signal and fb["query_id"] == "known"
        dead = [d for d in letters if d["value"] == value]
        assert (good or ignored) != bool(dead), (fb, dead)
        if fb["query_id"] != "known" and fb["app"] == "app" and signal:
            assert "unknown or expired query" in dead[0]["reason"]
    done = {p: o for (t, p), o in pipe.offsets.to_commit().items() if t == topics.FEEDBACK}
    assert done == {0: len(values)}, "every feedback message is done"
    # the key's writer folds the observations; bad snapshots are refused, not installed
    learned: list[str] = []
    learner = Learner(MemoryStore(), pipe.registry, dead_letter=lambda r, why: learned.append(why))
    observations = [
        (k, v, 0, i) for i, (t, v, k, _) in enumerate(producer.sent) if t == topics.OBSERVATIONS
    ]
    n = len(observations)
    made = sum(
        len(codec.decode("ObservationBatch", v)["observations"]) for _, v, _, _ in observations
    )
    learner.apply(observations + [(b"app", v, 0, n + i) for i, v in enumerate(bad_snapshots)])
    learner.flush()
    assert learner.counts["applied"] == made
    assert len(learned) == len(bad_snapshots)
    if n:
        state = learner.states["app"]
        weights = list(state.weights().values())
        assert all(math.isfinite(w) for w in weights) and sum(weights) == pytest.approx(1.0)
