"""The worker's and replica's loaded objects are out of the full collection's walk."""

from __future__ import annotations

import gc
import weakref

import pytest

from streams import heap


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
