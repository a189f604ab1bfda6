"""Which query partitions a worker serves while partitions move between workers.

The serving group rebalances eagerly (the range assignor keeps queries, answers and
feedback of one partition number together): every rebalance revokes all of a worker's
partitions and assigns a new set. Revoked partitions are frozen (nothing of theirs is
emitted: another worker may answer them next). On assignment, partitions kept go on as
they were; partitions given up are dropped (their next owner reads their unanswered
queries again); new ones, and ones whose restore a rebalance interrupted, are restored
first (worker.dedup: the predictions already made for them are read back) and served
after. Restores run in other threads and report back with the epoch of the assignment
they were for; a report from an earlier assignment is ignored."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clipstream.streams.worker.pipeline import Pipeline


@dataclass
class Assignment:
    epoch: int
    kept: set[int] = field(default_factory=set)
    new: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    dropped: int = 0


class Handover:
    def __init__(self, pipeline: Pipeline, restore: bool = True) -> None:
        self.pipeline = pipeline
        self.restore = restore
        #: assigned and restored: queries flow
        self.serving: set[int] = set()
        #: serving, and the answers their feedback needs restored too: feedback flows
        self.learning: set[int] = set()
        #: assigned, waiting for their restore
        self.restoring: set[int] = set()
        self.epoch = 0

    def revoked(self, partitions: Iterable[int]) -> None:
        self.pipeline.freeze(set(partitions))

    def lost(self, partitions: Iterable[int]) -> int:
        """Taken away without a revocation (the session expired): drop everything."""
        lost = set(partitions)
        self.serving -= lost
        self.learning -= lost
        self.restoring -= lost
        return self.pipeline.drop(lost)

    def assigned(self, partitions: Iterable[int], now: int) -> Assignment:
        assigned = set(partitions)
        self.epoch += 1
        # a partition whose restore (of either part) did not finish is restored again
        out = Assignment(
            self.epoch,
            kept=assigned & self.learning,
            new=assigned - self.learning,
            lost=(self.serving | self.restoring | self.pipeline.frozen) - assigned,
        )
        # given up, or read again from their committed offset after a new restore: what
        # is pending of them is forgotten (and answered when read again)
        out.dropped = self.pipeline.drop(out.lost | (out.new & self.serving))
        # kept: emit what they held; new: nothing of theirs is pending, but a partition whose
        # restore was interrupted was frozen too
        self.pipeline.thaw(assigned, now)
        self.serving = set(out.kept)
        self.learning = set(out.kept)
        if self.restore:
            self.restoring = set(out.new)
        else:
            self.serving |= out.new
            self.learning |= out.new
            self.restoring = set()
        return out

    def restored(self, epoch: int, recent: bool, partitions: set[int], found: list[Any]) -> bool:
        """A restore's result: False if it was for an earlier assignment."""
        if epoch != self.epoch:
            return False
        self.pipeline.restore(found)
        if recent:
            self.serving |= partitions & self.restoring
            self.restoring -= partitions
        else:
            self.learning |= partitions & self.serving
        return True
