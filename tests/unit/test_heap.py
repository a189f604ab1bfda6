"""What a full collection walks in a worker: not the objects loaded at start, not the
answers remembered for feedback, not the observations kept for a snapshot."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest

from clipstream.streams.learning.learner import Learner
from clipstream.streams.runtime import heap
from clipstream.streams.worker.answers import AnswerMemory, Remembered
from tests.unit.fakes import MemoryStore, make_registry, observation, records


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the rest of the test run collects as before


def test_objects_loaded_are_exempt_and_garbage_is_not(unfrozen: None) -> None:
    loaded = [{"tree": [i]} for i in range(10_000)]

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    garbage = weakref.ref(cycle)
    del cycle

    frozen = heap.freeze_loaded()

    assert frozen == gc.get_freeze_count() >= len(loaded)
    walked = {id(o) for o in gc.get_objects()}
    # a full collection walks what gc.get_objects() lists: none of the loaded objects
    assert not any(id(o) in walked for o in loaded)
    # the garbage of before was collected, not made immortal
    assert garbage() is None
    # what is allocated afterwards is collected as before
    later: list[object] = [[]]
    assert id(later) in {id(o) for o in gc.get_objects()}


def tracked_growth(fill: Callable[[], object]) -> int:
    """How many more objects a full collection walks once ``fill`` has run (what it
    returns is kept alive meanwhile)."""
    gc.collect()
    before = len(gc.get_objects())
    kept = fill()
    gc.collect()
    gc.collect()  # a tuple is untracked once what it holds is
    grown = len(gc.get_objects()) - before
    del kept
    return grown


def test_remembered_answers_are_not_walked_by_a_full_collection() -> None:
    def fill() -> AnswerMemory:
        memory = AnswerMemory(capacity=20_000, ttl_s=60)
        for i in range(10_000):
            labels = {"m1": str(i % 10), "m2": None}
            memory.keep(f"q{i}", Remembered(f"app|u{i % 32}", "app", labels, {"m1": 0.6}, i))
        return memory

    assert tracked_growth(fill) < 100
    memory = fill()
    found = memory.recall("q7", now_us=7)
    assert found == Remembered("app|u7", "app", {"m1": "7", "m2": None}, {"m1": 0.6}, 7)


def test_observations_kept_for_a_snapshot_are_not_walked_by_a_full_collection() -> None:
    registry = make_registry("EXP4", ("m1", "m2"), personalised=True)

    def fill() -> Learner:
        learner = Learner(MemoryStore(), registry)
        log = [
            observation(f"q{i}", {"m1": "1", "m2": "0"}, "1", i, key=f"app|u{i % 8}")
            for i in range(5_000)
        ]
        learner.apply(records(log))
        learner.flush()
        return learner

    assert tracked_growth(fill) < 500
