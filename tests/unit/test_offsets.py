"""What the worker may commit, and what it remembers of answered queries."""

from __future__ import annotations

from clipstream.streams.worker.answers import AnswerMemory, EmittedIds, Remembered
from clipstream.streams.worker.offsets import Offsets


def test_the_committable_offset_is_the_first_not_done_whatever_the_order() -> None:
    offsets = Offsets()
    for o in range(10, 15):
        offsets.read("t", 0, o)
    assert offsets.to_commit() == {}  # reading began at 10: nothing new to commit
    offsets.done("t", 0, 12)
    offsets.done("t", 0, 11)
    assert offsets.to_commit() == {}  # 10 still open
    offsets.done("t", 0, 10)
    assert offsets.to_commit() == {("t", 0): 13}
    offsets.mark_committed({("t", 0): 13})
    offsets.done("t", 0, 14)
    offsets.done("t", 0, 13)
    assert offsets.to_commit() == {("t", 0): 15}
    offsets.forget([("t", 0)])
    assert offsets.to_commit() == {} and offsets.position("t", 0) is None


def test_restored_entries_go_in_at_the_old_end_and_never_push_out_newer_ones() -> None:
    ids = EmittedIds(capacity=5)
    for q in ("l1", "l2", "l3"):
        ids.add(q)
    assert ids.restore(["r1", "r2", "r3", "r4"]) == 2  # room for two; the newest restored
    assert all(q in ids for q in ("l1", "l2", "l3", "r3", "r4"))
    ids.add("l4")  # the oldest goes first: a restored one
    assert "r3" not in ids and "l1" in ids

    memory = AnswerMemory(capacity=2, ttl_s=10)
    memory.keep("live", Remembered("app", "app", {}, {}, at_us=100))
    assert memory.restore([("old", Remembered("app", "app", {}, {}, at_us=50))]) == 1
    assert memory.recall("live", 200) is not None and memory.recall("old", 200) is not None
    assert memory.recall("live", 100 + 11_000_000) is None  # past its time to live
