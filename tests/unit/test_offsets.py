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


def test_a_restore_into_a_full_memory_keeps_the_newest_entries_by_log_time() -> None:
    """Issue 31: a takeover restores the predecessor's last answers into a memory already
    full of older live ones; the newest of both must be kept, not nothing of the restore."""
    ids = EmittedIds(capacity=5)
    for t, q in enumerate(("l1", "l2", "l3", "l4", "l5"), start=1):
        ids.add(q, t)
    assert ids.restore([("r1", 6), ("r2", 7), ("r3", 8), ("r4", 9)]) == 4
    assert [q for q in ("l1", "l2", "l3", "l4", "l5") if q in ids] == ["l5"]
    assert all(q in ids for q in ("r1", "r2", "r3", "r4")) and len(ids) == 5
    ids.add("l6", 10)  # the oldest goes first: the one live entry older than the restore
    assert "l5" not in ids and "r1" in ids


def test_a_restore_never_pushes_out_newer_entries_and_interleaves_by_time() -> None:
    ids = EmittedIds(capacity=4)
    for q, t in (("l1", 1), ("l3", 3), ("l5", 5)):
        ids.add(q, t)
    assert ids.restore([("r2", 2), ("r4", 4), ("r6", 6)]) == 2  # r2 is the oldest of all
    assert [q in ids for q in ("l1", "r2", "l3", "r4", "l5", "r6")] == [0, 0, 1, 1, 1, 1]
    ids.add("l7", 7)
    assert "l3" not in ids and "r4" in ids  # eviction still takes the oldest, by time
    # a restore older than everything held adds nothing and drops nothing
    assert ids.restore([("old", 0)]) == 0 and len(ids) == 4 and "old" not in ids


def test_a_restore_larger_than_the_memory_keeps_its_newest_whatever_the_fill() -> None:
    for held in (0, 2, 3):
        ids = EmittedIds(capacity=3)
        for i in range(held):
            ids.add(f"l{i}", i)
        assert ids.restore([(f"r{t}", 10 + t) for t in range(6)]) == 3
        assert [q for q in ("r3", "r4", "r5") if q in ids] == ["r3", "r4", "r5"]
        assert len(ids) == 3
    ids = EmittedIds(capacity=3)
    ids.add("same", 5)  # a restored id already held stays once
    assert ids.restore([("same", 4), ("r", 6)]) == 1 and len(ids) == 2


def test_the_answer_memory_restores_the_newest_into_a_full_memory_too() -> None:
    def remembered(at_us: int) -> Remembered:
        return Remembered("app", "app", {"m1": "1"}, {"m1": 1.0}, at_us=at_us)

    memory = AnswerMemory(capacity=3, ttl_s=10)
    for t in (1, 2, 3):
        memory.keep(f"live{t}", remembered(t))
    assert memory.restore([(f"old{t}", remembered(t)) for t in (4, 5)]) == 2
    assert memory.recall("live1", 10) is None and memory.recall("live2", 10) is None
    assert all(memory.recall(q, 10) is not None for q in ("live3", "old4", "old5"))
    # restored entries older than what a full memory holds stay out
    assert memory.restore([("older", remembered(0))]) == 0
    assert memory.recall("older", 10) is None and len(memory) == 3

    memory = AnswerMemory(capacity=2, ttl_s=10)
    memory.keep("live", remembered(100))
    assert memory.restore([("old", remembered(50))]) == 1
    assert memory.recall("live", 200) is not None and memory.recall("old", 200) is not None
    assert memory.recall("live", 100 + 11_000_000) is None  # past its time to live
