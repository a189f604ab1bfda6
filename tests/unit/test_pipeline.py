"""The worker's query path without Kafka (tests/unit/fakes.py stands in for the client
library, not for the broker; the integration tests use the real one)."""

from __future__ import annotations

from collections import deque

import pytest

from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.worker.emit import MAX_OBSERVATIONS_BYTES, PRODUCER_CONFIG, EmitterBroken
from clipstream.streams.worker.intake import MAX_CLIENT_SKEW_US
from tests.unit.fakes import (
    LOG_APPEND_TIME,
    FakeError,
    FakeMessage,
    answer_batches,
    feedback,
    make_pipeline,
    make_registry,
    query,
    query_value,
    result_for,
    take_batches,
)

# a long deadline: the tests step a made-up clock for batch windows, but answers are
# stamped with the real one, and a slow shared machine must not turn them into defaults
LONG = 60_000


def committed(pipe, topic: str = topics.QUERIES) -> dict[int, int]:
    return {p: o for (t, p), o in pipe.offsets.to_commit().items() if t == topic}


def test_each_query_gets_one_prediction_and_commits_only_after_delivery() -> None:
    pipe, producer = make_pipeline(inflight_per_replica=2)
    start = now_us()
    pipe.on_queries([query(f"q{i}", [1.0, 2.0, float(i)], offset=i) for i in range(10)], start)
    pipe.tick(start)
    assert not producer.on(topics.PREDICTIONS, "Prediction")
    assert committed(pipe) == {}  # nothing before its prediction exists
    # the idle model gets a batch at once; then one more while it has a free slot (2)
    assert [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")] == [4, 4]
    pipe.tick(start + 1_500)
    # the window ran out, but both slots are taken: the last 2 rows wait here, not in Kafka
    assert len(producer.on(topics.model_requests("m1"), "ModelBatch")) == 2
    assert answer_batches(pipe, producer) == 2
    pipe.tick(now_us())  # the model is free again: the waiting rows go out
    assert [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")] == [2]
    assert answer_batches(pipe, producer) == 1
    assert committed(pipe) == {}  # produced, not yet delivered
    producer.poll()
    preds = producer.on(topics.PREDICTIONS, "Prediction")
    assert sorted(p["query_id"] for p in preds) == sorted(f"q{i}" for i in range(10))
    assert all(p["label"] == "1" and p["score"] == pytest.approx(0.8) for p in preds)
    assert committed(pipe) == {0: 10}


def test_the_committed_offset_waits_for_the_first_query_not_answered() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2")))
    start = now_us()
    pipe.on_queries([query("a", offset=0), query("b", [3.0, 2.0, 1.0], offset=1)], start)
    pipe.tick(start)
    batches = take_batches(producer)
    # answer both models for b only: b is emitted and delivered, a still waits
    for batch in batches:
        result = result_for(batch)
        keep = [i for i, q in enumerate(batch["query_ids"]) if q == "b"]
        result["query_ids"] = ["b"]
        result["labels"] = [result["labels"][i] for i in keep]
        result["errors"] = [None]
        result["scores"] = result["scores"][16 * keep[0] : 16 * keep[0] + 16]
        pipe.on_results(
            [FakeMessage(topics.RESPONSES, codec.encode("ModelBatchResult", result))], start
        )
    producer.poll()
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["b"]
    assert committed(pipe) == {}  # not past a, whose result could still be lost


def test_prediction_goes_to_its_query_partition_keyed_by_query_id() -> None:
    pipe, producer = make_pipeline()
    pipe.on_queries([query("q", partition=3, deadline_ms=LONG)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    (where,) = producer.where(topics.PREDICTIONS)
    assert where["partition"] == 3
    assert [k for t, _, k, _ in producer.sent if t == topics.PREDICTIONS] == [b"q"]


def test_duplicate_query_ids_and_late_answers_do_not_emit_twice() -> None:
    pipe, producer = make_pipeline()
    now = now_us()
    pipe.on_queries([query("q", offset=0, deadline_ms=LONG)], now)
    pipe.on_queries([query("q", offset=1, deadline_ms=LONG)], now)  # redelivered
    pipe.tick(now)
    batches = take_batches(producer)
    for batch in batches * 2:  # the same answer twice, as after a replica crash
        value = codec.encode("ModelBatchResult", result_for(batch))
        pipe.on_results([FakeMessage(topics.RESPONSES, value)], now_us())
    pipe.on_queries([query("q", offset=2)], now_us())  # after it was answered
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["q"]
    assert pipe.counts["duplicates"] == 2
    assert pipe.counts["late_answers"] == 1
    producer.poll()
    assert committed(pipe) == {0: 3}


def test_deadline_emits_default_output_once_just_before_the_deadline() -> None:
    pipe, producer = make_pipeline()  # app deadline 50 ms, emit margin 2 ms
    start = now_us()
    pipe.on_queries([query("slow", sent=start)], start)
    assert pipe.tick(start + 10_000) == start + 48_000  # when it needs to run next
    assert not producer.on(topics.PREDICTIONS, "Prediction")
    pipe.tick(start + 48_000)
    (pred,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert pred["default"] is True and pred["label"] == "dflt" and pred["query_id"] == "slow"
    answer_batches(pipe, producer)  # the model answers after the deadline
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 1


def test_deadline_starts_at_the_brokers_stamp_when_the_client_clock_is_off() -> None:
    pipe, _ = make_pipeline()
    now = now_us()
    appended_ms = now // 1000

    def stamped(qid: str, sent: int) -> FakeMessage:
        value = query_value(qid, [1.0, 2.0, 3.0], sent=sent, deadline_ms=100)
        return FakeMessage(topics.QUERIES, value, None, 0, 0, (LOG_APPEND_TIME, appended_ms))

    behind = now - 1_000_000  # a client clock a second behind
    close = now - MAX_CLIENT_SKEW_US // 2
    pipe.on_queries([stamped("behind", behind), stamped("close", close)], now)
    deadlines = {p.query_id: p.deadline_us for p in pipe.pending.values()}
    assert deadlines["behind"] == appended_ms * 1000 + 100_000 - 2_000  # not long gone
    assert deadlines["close"] == close + 100_000 - 2_000  # its own clock is trusted


def test_cache_hit_answers_without_a_batch() -> None:
    pipe, producer = make_pipeline()
    pipe.on_queries([query("a", deadline_ms=LONG)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    pipe.on_queries([query("b", offset=1)], now_us())
    assert not producer.on(topics.model_requests("m1"), "ModelBatch")
    preds = {p["query_id"]: p for p in producer.on(topics.PREDICTIONS, "Prediction")}
    assert preds["b"]["cache_hit"] is True and preds["b"]["label"] == "1"
    assert preds["a"]["cache_hit"] is False


@pytest.mark.parametrize(
    ("value", "reason"), [(b"\x01\x02garbage", "not a valid Avro Query"), (b"", "empty message")]
)
def test_undecodable_query_is_dead_lettered_and_then_done(value, reason) -> None:
    pipe, producer = make_pipeline()
    pipe.on_queries([FakeMessage(topics.QUERIES, value, b"k", 3, 7)], now_us())
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")
    assert reason in letter["reason"] and letter["value"] == value
    assert (letter["partition"], letter["offset"], letter["stage"]) == (3, 7, "intake")
    assert committed(pipe) == {}
    producer.poll()
    assert committed(pipe) == {3: 8}


def test_wrong_dimension_gets_error_prediction_and_dead_letter() -> None:
    pipe, producer = make_pipeline()
    pipe.on_queries([query("bad", [1.0])], now_us())
    (pred,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert pred["query_id"] == "bad" and "expected 3 features" in pred["error"]
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")
    assert letter["query_id"] == "bad"


def test_by_default_one_batch_per_replica_is_in_flight_and_the_rest_batch_up_behind_it() -> None:
    pipe, producer = make_pipeline()
    start = now_us()
    pipe.on_queries([query("first", offset=0, deadline_ms=LONG)], start)
    pipe.tick(start)  # the idle model gets its row at once
    assert [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")] == [1]
    # while it computes, rows arriving one by one are not sent one by one
    for i in range(1, 4):
        pipe.on_queries([query(f"q{i}", offset=i, deadline_ms=LONG)], start + i * 4_000)
        pipe.tick(start + i * 4_000)
    assert len(producer.on(topics.model_requests("m1"), "ModelBatch")) == 1
    assert answer_batches(pipe, producer) == 1
    pipe.tick(now_us())  # the model is free: what waited goes as one batch
    assert [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")] == [3]
    assert answer_batches(pipe, producer) == 1
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 4


def test_an_idle_model_holds_a_row_for_a_second_one_while_rows_come_densely() -> None:
    pipe, producer = make_pipeline(batch_idle_wait_ms=8.0)
    start = now_us()

    def arrive(qid: str, at: int, offset: int, deadline_ms: float = LONG) -> int | None:
        # features of its own: a cache hit would need no batch
        features = [float(offset), 2.0, 3.0]
        pipe.on_queries([query(qid, features, offset=offset, deadline_ms=deadline_ms, sent=at)], at)
        return pipe.tick(at)

    def answered() -> list[int]:
        """Play the replica: the rows of each batch sent since the last call, answered."""
        rows = [b["rows"] for b in producer.on(topics.model_requests("m1"), "ModelBatch")]
        answer_batches(pipe, producer)  # the model is idle again
        return rows

    arrive("q0", start, 0)  # no gap known yet: at once
    assert answered() == [1]
    wake = arrive("q1", start + 4_000, 1)  # rows 4 ms apart, under the 8 ms wait: q1 waits
    assert wake == start + 4_000 + 8_000 and answered() == []
    arrive("q2", start + 8_000, 2)  # the second row came: both go as one batch
    assert answered() == [2]
    arrive("q3", start + 12_000, 3)
    assert answered() == []
    pipe.tick(start + 20_000)  # no second row within the wait: q3 goes alone
    assert answered() == [1]
    arrive("tight", start + 24_000, 4, deadline_ms=20)  # 20 ms left is < 4 x 8 ms: no wait
    assert answered() == [1]
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 5


def test_a_straggler_is_recorded_in_the_answers_and_remembered_as_a_loss() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2")))
    start = now_us()
    pipe.on_queries([query("q", sent=start)], start)
    pipe.tick(start)
    answer_batches(pipe, producer, only="m1")  # m2 never answers
    pipe.tick(start + 51_000)
    (pred,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert pred["models"] == ["m1@1"] and not pred["default"]
    by_model = {a["model"]: a for a in pred["answers"]}
    assert by_model["m2"]["label"] is None and "deadline" in by_model["m2"]["error"]
    assert by_model["m2"]["prob"] == pytest.approx(0.5)
    assert pipe.memory.recall("q", start).labels == {"m1": "1", "m2": None}


def test_a_busy_model_is_not_sent_rows_that_cannot_come_back_in_time() -> None:
    pipe, producer = make_pipeline(inflight_per_replica=2)  # busy, with a slot free
    pipe.dispatch.trips["m1"] = deque([50_000, 60_000])  # a batch takes 50 ms or more
    pipe.dispatch.inflight["m1"] = 1  # and the model is busy
    start = now_us()
    pipe.on_queries(
        [query("soon", deadline_ms=10), query("later", offset=1, deadline_ms=LONG)], start
    )
    pipe.tick(start + 5_000)  # the batch window ran out
    sent = producer.on(topics.model_requests("m1"), "ModelBatch")
    assert [b["query_ids"] for b in sent] == [["later"]]
    assert pipe.dispatch.hopeless_rows == 1
    pipe.tick(start + 20_000)  # "soon" still gets its one prediction: the default
    (soon,) = producer.on(topics.PREDICTIONS, "Prediction")
    assert soon["query_id"] == "soon" and soon["default"]


def test_rows_of_every_partition_share_one_batch() -> None:
    pipe, producer = make_pipeline(inflight_per_replica=2)
    pipe.dispatch.inflight["m1"] = 1  # busy: rows wait for a full batch
    now = now_us()
    pipe.on_queries([query(f"q{p}", partition=p, deadline_ms=LONG) for p in range(4)], now)
    pipe.tick(now)
    (batch,) = producer.on(topics.model_requests("m1"), "ModelBatch")
    assert batch["query_ids"] == ["q0", "q1", "q2", "q3"]
    answer_batches(pipe, producer)
    preds = producer.where(topics.PREDICTIONS)
    assert sorted(kw["partition"] for kw in preds) == [0, 1, 2, 3]


def test_a_refused_prediction_is_retried_then_dead_lettered_and_its_offset_moves_on() -> None:
    pipe, producer = make_pipeline()
    producer.fail[topics.PREDICTIONS] = FakeError(10)  # MESSAGE_TOO_LARGE: for good
    pipe.on_queries([query("q", deadline_ms=LONG)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    producer.poll()
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 2  # tried, and once more
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")
    assert (
        letter["query_id"] == "q" and "not delivered to clipstream.predictions" in letter["reason"]
    )
    assert codec.decode("Prediction", letter["value"])["query_id"] == "q"
    assert committed(pipe) == {0: 1}  # the partition moves on


def test_a_prediction_that_timed_out_is_not_produced_again_out_of_order() -> None:
    """A second produce would land after records produced later to its partition: the
    emitter stops instead, and the offset never passes the record."""
    pipe, producer = make_pipeline()
    producer.fail[topics.PREDICTIONS] = FakeError(-192, retriable=True)  # _MSG_TIMED_OUT
    pipe.on_queries([query("q", deadline_ms=LONG)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    producer.poll()
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 1  # produced once only
    assert committed(pipe) == {}
    assert not producer.on(topics.DEADLETTER, "DeadLetter")
    with pytest.raises(EmitterBroken, match=r"clipstream\.predictions record not delivered"):
        pipe.emitter.check()


def test_the_workers_producer_retries_in_order_without_a_timeout() -> None:
    assert PRODUCER_CONFIG == {"enable.idempotence": True, "message.timeout.ms": 0}


def test_feedback_becomes_observations_one_message_per_keys_partition() -> None:
    pipe, producer = make_pipeline(
        make_registry("EXP4", ("m1", "m2"), personalised=True), partitions=4
    )
    now = now_us()
    users = ("ann", "bob", "cid")  # partitions 3, 2, 3
    for i, user in enumerate(users):
        pipe.on_queries([query(f"q{i}", user=user, deadline_ms=LONG, offset=i)], now)
    pipe.tick(now)
    answer_batches(pipe, producer)
    pipe.on_feedback(
        [feedback(f"q{i}", label="0", partition=2, offset=9 + i) for i in range(3)], now_us()
    )
    batches = producer.on(topics.OBSERVATIONS, "ObservationBatch")
    where = [kw["partition"] for kw in producer.where(topics.OBSERVATIONS)]
    assert where == [3, 2]  # one message each, in the order their first feedback came
    assert [[o["key"] for o in b["observations"]] for b in batches] == [
        ["app|ann", "app|cid"],
        ["app|bob"],
    ]
    assert all(
        where[n] == topics.partition_for(o["key"], 4)
        for n, b in enumerate(batches)
        for o in b["observations"]
    )
    obs = batches[0]["observations"][0]
    assert (obs["user"], obs["label"], obs["query_id"]) == ("ann", "0", "q0")
    assert (obs["feedback_partition"], obs["feedback_offset"]) == (2, 9)
    assert {a["model"]: (a["label"], a["prob"]) for a in obs["answers"]} == {
        "m1": ("1", pytest.approx(0.5)),
        "m2": ("1", pytest.approx(0.5)),
    }
    # the feedback is done when the message holding its observation is delivered
    deliveries = [(m, cb) for m, cb in producer._callbacks if m.topic() == topics.OBSERVATIONS]
    (to_3, done_3), (to_2, done_2) = deliveries
    done_2(None, to_2)
    assert committed(pipe, topics.FEEDBACK) == {}  # 9 and 11 went to partition 3
    done_3(None, to_3)
    assert committed(pipe, topics.FEEDBACK) == {2: 12}


def test_observations_of_large_feedback_are_split_under_the_message_limit() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2")), partitions=1)
    now = now_us()
    for i in range(4):
        pipe.on_queries([query(f"q{i}", deadline_ms=LONG, offset=i)], now)
    pipe.tick(now)
    answer_batches(pipe, producer)
    label = "x" * (MAX_OBSERVATIONS_BYTES * 2 // 3)
    pipe.on_feedback([feedback(f"q{i}", label=label, offset=i) for i in range(4)], now_us())
    assert producer.on(topics.DEADLETTER, "DeadLetter") == []
    sent = [v for t, v, _, _ in producer.sent if t == topics.OBSERVATIONS]
    assert len(sent) == 4 and all(len(v) <= MAX_OBSERVATIONS_BYTES for v in sent)
    made = [o for v in sent for o in codec.decode("ObservationBatch", v)["observations"]]
    assert [o["query_id"] for o in made] == [f"q{i}" for i in range(4)]
    producer.poll()
    assert committed(pipe, topics.FEEDBACK) == {0: 4}


def test_feedback_before_its_answer_waits_for_it_and_its_partition_keeps_order() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2")))
    pipe.on_queries([query("answered", deadline_ms=LONG)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    # other features: not answered from the cache
    pipe.on_queries([query("waiting", [4.0, 5.0, 6.0], deadline_ms=LONG, offset=1)], now_us())
    pipe.tick(now_us())
    assert "waiting" in pipe.pending
    # the label is known before the models answered; feedback behind it waits with it
    pipe.on_feedback([feedback("waiting", offset=0), feedback("answered", offset=1)], now_us())
    pipe.tick(now_us())
    assert producer.on(topics.OBSERVATIONS, "ObservationBatch") == []
    assert producer.on(topics.DEADLETTER, "DeadLetter") == []
    producer.poll()
    assert committed(pipe, topics.FEEDBACK) == {}
    answer_batches(pipe, producer)
    pipe.tick(now_us())
    made = [
        (o["query_id"], o["feedback_offset"])
        for batch in producer.on(topics.OBSERVATIONS, "ObservationBatch")
        for o in batch["observations"]
    ]
    assert made == [("waiting", 0), ("answered", 1)]  # in the partition's order
    producer.poll()
    assert committed(pipe, topics.FEEDBACK) == {0: 2}


def test_feedback_parked_on_a_partition_given_up_is_left_to_its_next_owner() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2")))
    pipe.on_queries([query("waiting", deadline_ms=LONG)], now_us())
    pipe.tick(now_us())
    pipe.on_feedback([feedback("waiting")], now_us())
    pipe.drop({0})
    pipe.tick(now_us())
    assert producer.on(topics.DEADLETTER, "DeadLetter") == []
    assert pipe.feedback.parked == {}


def test_feedback_without_its_answers_is_dead_lettered_and_single_model_apps_ignore_it() -> None:
    pipe, producer = make_pipeline(make_registry("EXP4", ("m1", "m2")))
    pipe.on_feedback([feedback("never-seen")], now_us())
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")
    assert "unknown or expired query" in letter["reason"] and letter["stage"] == "feedback"
    single, producer = make_pipeline()
    single.on_queries([query("asked", deadline_ms=LONG)], now_us())
    single.tick(now_us())
    answer_batches(single, producer)
    producer.sent.clear()
    single.on_feedback([feedback("asked", offset=4), feedback("never", offset=5)], now_us())
    (letter,) = producer.on(topics.DEADLETTER, "DeadLetter")  # only for the unknown one
    assert letter["query_id"] == "never" and "unknown or expired query" in letter["reason"]
    producer.poll()
    assert committed(single, topics.FEEDBACK) == {0: 6}


def test_frozen_partitions_hold_their_predictions_until_thawed_or_dropped() -> None:
    pipe, producer = make_pipeline()
    start = now_us()
    pipe.on_queries(
        [query("kept", partition=0, sent=start), query("moved", partition=1, sent=start)], start
    )
    pipe.freeze({0, 1})
    pipe.tick(start + 60_000)  # both deadlines pass during the rebalance
    assert not producer.on(topics.PREDICTIONS, "Prediction")
    assert pipe.drop({1}) == 1  # given to another worker: never answered here
    pipe.thaw({0}, start + 61_000)
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["kept"]
    answer_batches(pipe, producer)
    assert len(producer.on(topics.PREDICTIONS, "Prediction")) == 1


def test_the_deadline_heap_stays_bounded_however_long_the_deadlines() -> None:
    pipe, producer = make_pipeline(cache_size=0)
    now = now_us()
    for round_ in range(20):
        pipe.on_queries(
            [
                query(f"q{round_}-{i}", [1.0, 2.0, float(i)], deadline_ms=600_000)
                for i in range(100)
            ],
            now,
        )
        while take_batches(producer):
            pass
        pipe.dispatch.inflight.clear()
        pipe.dispatch.batches.clear()
        for p in pipe.pending.values():  # answered long before their deadline
            pipe.pending.pop(p.query_id)
    assert len(pipe.pending) == 0
    assert pipe.pending.heap_size() <= 1024 + 100
