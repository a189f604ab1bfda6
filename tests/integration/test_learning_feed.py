"""The learning feed over a real broker: its fetches are held up to a batch time, and
nothing that is not learning may wait for them (issue 16: a worker's queries stood still
for 3.9 s on each rebalance at 1000 ms, and its start-up read the changelog a second at a
time)."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Producer

from clipstream.streams.learning.feed import LearningFeed
from clipstream.streams.wire import topics
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

#: long enough that waiting out one held fetch cannot pass for not waiting at all
BATCH_MS = 5000


class Recorded:
    """A changelog reader that keeps what it was given, in order."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, bytes | None]] = []

    def apply(self, key: str, value: bytes | None) -> None:
        self.applied.append((key, value))


def write_states(settings, start: int, count: int) -> None:
    producer = Producer(settings.kafka())
    for i in range(start, start + count):
        producer.produce(
            topics.SELECTION_CHANGELOG, key=f"app|u{i}".encode(), value=b"s%d" % i, partition=i % 4
        )
    assert producer.flush(30) == 0


def changelog_ends(settings) -> dict[int, int]:
    feed = LearningFeed(settings, Recorded())
    try:
        return feed.end_offsets(feed.partitions)
    finally:
        feed.close()


def test_catch_up_and_questions_do_not_wait_for_held_fetches(kafka_settings):
    ends = changelog_ends(kafka_settings)
    write_states(kafka_settings, 0, 40)  # a few KiB: never enough to end a held fetch early
    view = Recorded()
    feed = LearningFeed(kafka_settings, view, batch_ms=BATCH_MS)
    try:
        started = time.monotonic()
        assert feed.catch_up() == sum(ends.values()) + 40
        assert time.monotonic() - started < BATCH_MS / 1000, "catch-up waited out a held fetch"
        assert {b"s%d" % i for i in range(40)} <= {v for _, v in view.applied}

        # the feed's own fetch is held now; the serving thread drains while another thread
        # asks for the changelog's ends, as a worker does on every rebalance
        feed.drain(256)
        asked: dict[str, object] = {}

        def ask() -> None:
            t = time.monotonic()
            asked["ends"] = feed.end_offsets(feed.partitions)
            asked["seconds"] = time.monotonic() - t

        thread = threading.Thread(target=ask)
        thread.start()
        longest = 0.0
        while thread.is_alive():
            t = time.monotonic()
            feed.drain(256)
            longest = max(longest, time.monotonic() - t)
            thread.join(0.01)
        assert asked["ends"] == {p: ends.get(p, 0) + 10 for p in range(4)}
        assert asked["seconds"] < BATCH_MS / 1000, "the ends waited out held fetches"
        assert longest < BATCH_MS / 1000 / 2, f"a drain waited {longest:.1f} s for the question"
    finally:
        feed.close()


def test_the_changelog_is_followed_from_where_catch_up_ended(kafka_settings):
    """No state read twice, none skipped, between the catch-up's reader and the feed's own
    consumer."""
    ends = changelog_ends(kafka_settings)
    write_states(kafka_settings, 1000, 20)
    view = Recorded()
    feed = LearningFeed(kafka_settings, view, batch_ms=200)
    try:
        caught = feed.catch_up()
        assert caught == sum(ends.values()) + 20
        with pytest.raises(RuntimeError):
            feed.catch_up()
        write_states(kafka_settings, 2000, 30)

        def followed() -> bool:
            feed.drain(256)
            return len(view.applied) >= caught + 30

        wait_for(followed, 30, "the states written after the catch-up")
        later = [v for _, v in view.applied[caught:]]
        assert sorted(later) == sorted(b"s%d" % i for i in range(2000, 2030))
        assert feed.caught_up(feed.end_offsets(feed.partitions))
    finally:
        feed.close()
