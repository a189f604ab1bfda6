"""One writer per selection key, without Kafka: the learner folds observations in log order
into a table, replay folds the same log to the same state bit for bit, snapshots are
brought up to date, and every worker's view reads what the writer wrote."""

from __future__ import annotations

import gc
import json
import logging

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException

from clipstream.selection import SelectionState
from clipstream.streams.learning.feed import LearningFeed
from clipstream.streams.learning.learner import ChangelogStore, Learner
from clipstream.streams.learning.replay import Observed, observations_of, rebuild
from clipstream.streams.learning.state_view import StateView
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.emit import Emitter
from clipstream.streams.worker.offsets import Offsets
from tests.unit.fakes import (
    MemoryStore,
    RecordingProducer,
    batches,
    make_registry,
    observation,
    records,
)


def stream(n: int, seed: int = 0) -> list[dict]:
    """Feedback from two feedback partitions: m1 is right 90% of the time, m2 50%."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        truth = str(int(rng.integers(2)))
        m1 = truth if rng.random() < 0.9 else str(1 - int(truth))
        m2 = truth if rng.random() < 0.5 else str(1 - int(truth))
        out.append(observation(f"q{i}", {"m1": m1, "m2": m2}, truth, i // 2, fb_partition=i % 2))
    return out


def snapshot(key: str, state: SelectionState, observed_offset: int) -> bytes:
    """A replay's snapshot of ``key``, made from the messages up to ``observed_offset``."""
    return codec.encode(
        "SelectionSnapshot",
        {
            "key": key,
            "app": "app",
            "state": json.dumps(state.to_state()),
            "source": "test",
            "at_us": 0,
            "observed_offset": observed_offset,
        },
    )


def test_live_folding_in_chunks_equals_replay_bit_for_bit() -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    table = MemoryStore()
    learner = Learner(table, registry)
    made = stream(500)
    # a log an older release began (one observation a message) and this one went on with
    log = records(made[:100]) + batches(made[100:], per=9, start=100)
    for i in range(0, len(log), 7):  # fetched batches of any size
        learner.apply(log[i : i + 7])
        if i % 14 == 0:
            learner.flush()  # written now and then, not after every fetch
    learner.flush()
    live = SelectionState.from_state(table[b"app"])
    replayed, counts = rebuild(
        registry, "app", [o for k, v, p, i in log for o in observations_of("app", p, i, k, v)]
    )
    assert counts["applied"] == 500 == learner.counts["applied"]
    assert replayed["app"].to_state() == live.to_state()  # exact floats, not approx
    w = live.weights()
    assert w["m1"] > 0.9 > w["m2"]


def test_a_redelivered_observation_is_not_applied_twice() -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    table = MemoryStore()
    learner = Learner(table, registry)
    log = records(stream(40))
    learner.apply(log)
    learner.flush()
    once = json.dumps(table[b"app"])
    # a worker re-read feedback after a crash and made the last 10 observations again
    again = records([codec.decode("Observation", v) for _, v, _, _ in log[-10:]], start=40)
    learner.apply(again)
    learner.flush()
    assert json.dumps(table[b"app"]) == once
    assert learner.counts["replayed"] == 10


def test_a_snapshot_replaces_the_state_and_keeps_what_came_after_the_replay_read() -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    table = MemoryStore()
    learner = Learner(table, registry)
    log = records(stream(60))
    learner.apply(log[:50])
    # replay read offsets 0-49 and folded them; meanwhile 50-59 arrived and were applied
    replayed, _ = rebuild(
        registry, "app", [Observed(1, i, codec.decode("Observation", v)) for _, v, _, i in log[:50]]
    )
    learner.apply(log[50:])
    learner.apply([(b"app", snapshot("app", replayed["app"], 49), 1, 60)])
    learner.flush()
    everything, _ = rebuild(
        registry, "app", [Observed(1, i, codec.decode("Observation", v)) for _, v, _, i in log]
    )
    assert table[b"app"] == everything["app"].to_state()


def test_a_snapshot_of_one_key_is_brought_up_to_date_from_batches_of_several_keys() -> None:
    registry = make_registry("EXP4", ("m1", "m2"), personalised=True)
    table = MemoryStore()
    learner = Learner(table, registry)
    made = stream(120)
    for i, o in enumerate(made):
        o["user"] = f"u{i % 2}"
        o["key"] = f"app|{o['user']}"
    log = batches(made, per=6)  # 20 messages, each with both keys
    learner.apply(log[:15])
    read = [o for k, v, p, i in log[:12] for o in observations_of("app", p, i, k, v)]
    replayed, _ = rebuild(registry, "app", read)  # the replay read messages 0-11
    learner.apply(log[15:])
    learner.apply([(b"app|u0", snapshot("app|u0", replayed["app|u0"], 11), 1, 20)])
    learner.flush()
    everything, _ = rebuild(
        registry, "app", [o for k, v, p, i in log for o in observations_of("app", p, i, k, v)]
    )
    assert table[b"app|u0"] == everything["app|u0"].to_state()  # 12-19 folded again, u0's only
    assert table[b"app|u1"] == everything["app|u1"].to_state()
    assert replayed["app|u0"].to_state() != everything["app|u0"].to_state()


def test_observations_a_worker_made_fold_without_decoding_to_the_same_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    made = stream(300)
    for o in made[::3]:  # some rewards and a user, as the pipeline makes them
        o["label"], o["reward"], o["user"] = None, 0.25, "u"
    log = batches(made, per=3)
    decoded = Learner(MemoryStore(), registry)
    decoded.apply(log)
    table = MemoryStore()
    learner = Learner(table, registry, made=70)
    for n, (_, value, _, _) in enumerate(log):
        learner.made(value, made[3 * n : 3 * n + 3])  # the first 30 are pushed out by the bound
    for _ in range(3):  # a collection untracks one level of nested tuples
        gc.collect()
    assert not any(gc.is_tracked(kept) for kept in learner._made.values())  # runtime.heap
    decodes = []
    real_decode = codec.decode
    monkeypatch.setattr(
        codec, "decode", lambda kind, data: decodes.append(kind) or real_decode(kind, data)
    )
    learner.apply(log)
    learner.flush()
    assert len(decodes) == 30  # those pushed out, and only those
    assert table[b"app"] == decoded.states["app"].to_state()  # exact floats
    assert learner.counts["applied"] == 300 and not learner._made
    learner.made(log[0][1], made[:3])
    learner.drop()  # its partitions are another worker's: what it made is not read here
    assert not learner._made


def test_garbage_on_the_observations_topic_is_dead_lettered() -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    letters: list[tuple[int, str]] = []
    table = MemoryStore()
    learner = Learner(
        table, registry, dead_letter=lambda record, reason: letters.append((record[3], reason))
    )
    gone = observation("q0", {"m1": "1"}, "1", 0)
    gone["app"] = "gone"
    good = [observation(f"q{i}", {"m1": "1"}, "1", i) for i in (1, 2)]
    learner.apply(
        [
            (b"app", b"\x00junk", 0, 0),
            (None, codec.encode("Observation", good[0]), 0, 1),
            *batches([gone, good[1]], per=2, start=2, partition=0),
        ]
    )
    learner.flush()
    # a message with nothing to fold is dead-lettered, and done with its dead letter
    assert [at for at, _ in letters] == [0, 1]
    assert "Observation record without its selection key" in letters[1][1]
    # one observation of a batch that cannot be folded is dead-lettered as a record of its
    # own, done with the write of the others
    assert learner.counts["applied"] == 1 and table.done == [(0, 2)]
    ((key, value, partition, offset, reason),) = table.rejected
    assert (key, partition, offset) == (b"app", 0, 2) and "unknown app 'gone'" in reason
    assert codec.decode("Observation", value)["query_id"] == "q0"


def test_every_worker_chooses_from_what_the_writer_wrote() -> None:
    registry = make_registry("EXP4", ("m1", "m2"))
    app = registry.app("app")
    table = MemoryStore()
    learner = Learner(table, registry)
    learner.apply(records(stream(300)))
    learner.flush()
    view = StateView(decoded_capacity=2)
    assert view.state_for("app", app).weights()["m1"] == pytest.approx(0.5)  # nothing yet
    view.apply("app", json.dumps(table[b"app"]).encode())  # the changelog record arrives
    assert (
        view.state_for("app", app).weights() == SelectionState.from_state(table[b"app"]).weights()
    )
    for user in ("a", "b", "c"):  # the decoded states stay within their bound
        view.state_for(f"app|{user}", app)
    assert len(view._decoded) == 2 and len(view) == 1
    assert view.state_for("app", app).weights()["m1"] > 0.8  # decoded again from its record
    view.apply("app", b"{not json")  # a record this release cannot read
    assert view.state_for("app", app).weights()["m1"] == pytest.approx(0.5)


def test_each_key_is_written_once_per_flush_however_many_observations() -> None:
    registry = make_registry("EXP4", ("m1", "m2"), personalised=True)
    table = MemoryStore()
    learner = Learner(table, registry)
    log = [
        observation(f"q{i}", {"m1": "1", "m2": "0"}, "1", i, key=f"app|u{i % 3}", user=f"u{i % 3}")
        for i in range(90)
    ]
    for i in range(0, 90, 1):  # one observation per fetch, as at a low rate
        learner.apply(records(log[i : i + 1], start=i))
    assert table.writes == 0  # folded, not yet written
    assert learner.flush() == 3
    assert table.writes == 3 and set(table) == {b"app|u0", b"app|u1", b"app|u2"}
    assert learner.flush() == 0 and table.writes == 3


def test_weights_are_reported_for_shared_states_only() -> None:
    """A personalised app has a state per user: too many series for Prometheus labels."""

    class Recording(Sensor):
        def __init__(self) -> None:
            self.weights: list[str] = []

        def on_weights(self, app, weights) -> None:  # type: ignore[override]
            self.weights.append(app)

    sensor = Recording()
    registry = make_registry("EXP4", ("m1", "m2"), personalised=True)
    learner = Learner(MemoryStore(), registry, sensor)
    users = [
        observation(f"q{i}", {"m1": "1"}, "1", i, key=f"app|u{i}", user=f"u{i}") for i in range(50)
    ]
    learner.apply(records(users))
    learner.flush()
    assert sensor.weights == []
    shared = Learner(MemoryStore(), make_registry("EXP4", ("m1", "m2")), sensor)
    shared.apply(records(stream(10)))
    shared.flush()
    assert sensor.weights == ["app"]


def test_observations_are_done_only_with_the_write_that_holds_them() -> None:
    """Applied and already-applied observations alike wait for the next write: the state
    that has them may not be stored yet. A dropped learner (its partitions taken away
    without a revocation) writes nothing and makes nothing done."""
    registry = make_registry("EXP4", ("m1", "m2"))
    table = MemoryStore()
    learner = Learner(table, registry)
    log = records(stream(10))
    learner.apply(log)
    learner.apply(records([codec.decode("Observation", v) for _, v, _, _ in log[:3]], start=10))
    assert table.done == [] and learner.unwritten == 13
    learner.flush()
    assert table.done == [(1, i) for i in range(13)]
    learner.apply(records(stream(5, seed=1), start=13))
    learner.drop()
    assert learner.flush() == 0 and table.done == [(1, i) for i in range(13)]
    assert learner.states == {} and table.writes == 1


def test_the_changelog_store_writes_each_key_to_its_partition_and_is_done_when_all_land() -> None:

    producer, offsets, view = RecordingProducer(), Offsets(), StateView()
    store = ChangelogStore(view, Emitter(producer, offsets, Sensor()), partitions=4)
    registry = make_registry("EXP4", ("m1", "m2"), personalised=True)
    learner = Learner(store, registry)
    log = [
        observation(f"q{i}", {"m1": "1", "m2": "0"}, "1", i, key=f"app|u{i % 3}", user=f"u{i % 3}")
        for i in range(9)
    ]
    for i, o in enumerate(log):
        offsets.read(topics.OBSERVATIONS, 2, i)
        learner.apply(records([o], start=i, partition=2))
    learner.flush()
    sent = [(key, kw) for t, _, key, kw in producer.sent if t == topics.SELECTION_CHANGELOG]
    assert sorted(key for key, _ in sent) == [b"app|u0", b"app|u1", b"app|u2"]
    for key, kw in sent:
        assert kw["partition"] == topics.partition_for(key.decode(), 4)
    # the writer chooses from its own latest state at once, before the changelog has it
    app = registry.app("app")
    assert view.state_for("app|u0", app) is learner.states["app|u0"]
    # two of three writes delivered: nothing done yet; the third: all nine
    deliveries = list(producer._callbacks)
    for message, delivered in deliveries[:2]:
        delivered(None, message)
    assert offsets.to_commit() == {}
    message, delivered = deliveries[2]
    delivered(None, message)
    assert offsets.to_commit() == {(topics.OBSERVATIONS, 2): 9}
    # where this writer reads its partitions from again once another may write them
    assert store.emitter.states_written == {
        m.partition(): max(n.offset() for n, _ in deliveries if n.partition() == m.partition()) + 1
        for m, _ in deliveries
    }
    # its own records read back from the changelog change nothing; after a rebalance the
    # changelog is the truth again
    before = view.state_for("app|u0", app)
    view.apply("app|u0", json.dumps(SelectionState.following(None, app).to_state()).encode())
    assert view.state_for("app|u0", app) is before
    view.disown()
    view.apply("app|u0", json.dumps(SelectionState.following(None, app).to_state()).encode())
    assert view.state_for("app|u0", app).weights()["m1"] == pytest.approx(0.5)


def test_observations_rejected_from_a_message_are_dead_lettered_with_its_write() -> None:
    producer, offsets, view = RecordingProducer(), Offsets(), StateView()
    store = ChangelogStore(view, Emitter(producer, offsets, Sensor()), partitions=4)
    learner = Learner(store, make_registry("EXP4", ("m1", "m2")))
    gone = observation("q0", {"m1": "1"}, "1", 0)
    gone["app"] = "gone"
    offsets.read(topics.OBSERVATIONS, 2, 0)
    learner.apply(batches([gone, observation("q1", {"m1": "1"}, "1", 1)], per=2, partition=2))
    learner.flush()
    sent = {t: v for t, v, _, _ in producer.sent}
    assert set(sent) == {topics.SELECTION_CHANGELOG, topics.DEADLETTER}
    letter = codec.decode("DeadLetter", sent[topics.DEADLETTER])
    assert (letter["source_topic"], letter["partition"], letter["offset"]) == (
        topics.OBSERVATIONS,
        2,
        0,
    )
    assert codec.decode("Observation", letter["value"])["query_id"] == "q0"
    # the message is done once the state and the dead letter are both delivered
    (first, delivered), second = producer._callbacks
    delivered(None, first)
    assert offsets.to_commit() == {}
    second[1](None, second[0])
    assert offsets.to_commit() == {(topics.OBSERVATIONS, 2): 1}


def test_a_flush_with_nothing_to_write_makes_its_observations_done_at_once() -> None:

    producer, offsets = RecordingProducer(), Offsets()
    offsets.read(topics.OBSERVATIONS, 0, 7)
    Emitter(producer, offsets, Sensor()).states([], [(topics.OBSERVATIONS, 0, 7)])
    assert producer.sent == [] and offsets.to_commit() == {(topics.OBSERVATIONS, 0): 8}


class _FeedError:
    def __init__(self, code: int, fatal: bool) -> None:
        self._code, self._fatal = code, fatal

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return self._fatal


class _ErrorMessage:
    def __init__(self, err: _FeedError) -> None:
        self._err = err

    def error(self) -> _FeedError:
        return self._err


class _Fetched:
    def __init__(self, messages: list) -> None:
        self.messages = messages

    def consume(self, n: int, timeout: float) -> list:
        out, self.messages = self.messages[:n], self.messages[n:]
        return out


def _feed_over(messages: list) -> LearningFeed:
    feed = object.__new__(LearningFeed)  # no broker: only drain() is under test
    feed.consumer = _Fetched(messages)
    return feed


def test_the_learning_feed_stops_on_a_fatal_consumer_error() -> None:
    feed = _feed_over([_ErrorMessage(_FeedError(KafkaError._FENCED, fatal=True))])
    with pytest.raises(KafkaException):
        feed.drain(10)


def test_the_learning_feed_logs_a_passing_consumer_error_and_goes_on(caplog) -> None:
    feed = _feed_over([_ErrorMessage(_FeedError(KafkaError._TRANSPORT, fatal=False))])
    with caplog.at_level(logging.WARNING, logger="clipstream.learning"):
        assert feed.drain(10) == []
    assert "learning feed" in caplog.text
