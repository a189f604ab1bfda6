"""Which offsets of the worker's input partitions may be committed.

A message is *done* once everything it caused is safely on Kafka (its prediction, its
observation or its dead letter delivered). The committable offset of a partition is the
first offset read and not done; offsets past it wait, whatever order they finish in. The
serving loop commits these in one place (worker.serving), after the producer delivered
what they caused."""

from __future__ import annotations

from collections.abc import Iterable


class PartitionOffsets:
    """Offsets read from one partition and not yet committable, in read order."""

    __slots__ = ("_open", "next")

    def __init__(self) -> None:
        # offset -> done; insertion order is read order (offsets only grow)
        self._open: dict[int, bool] = {}
        #: the offset after the last one read: where reading goes on
        self.next: int | None = None

    def read(self, offset: int) -> None:
        self._open[offset] = False
        self.next = offset + 1

    def done(self, offset: int) -> None:
        if offset in self._open:
            self._open[offset] = True

    def committable(self) -> int | None:
        """The offset to commit: the first not done, or past the last read."""
        opened = self._open
        while opened:
            first = next(iter(opened))
            if not opened[first]:
                return first
            del opened[first]
        return self.next

    def __len__(self) -> int:
        return len(self._open)


class Offsets:
    """PartitionOffsets per (topic, partition), with what was last committed."""

    def __init__(self) -> None:
        self.partitions: dict[tuple[str, int], PartitionOffsets] = {}
        self.committed: dict[tuple[str, int], int] = {}

    def read(self, topic: str, partition: int, offset: int) -> None:
        tp = (topic, partition)
        found = self.partitions.get(tp)
        if found is None:
            found = self.partitions[tp] = PartitionOffsets()
            # reading starts where the group's committed offset was: nothing to commit there
            self.committed.setdefault(tp, offset)
        found.read(offset)

    def done(self, topic: str, partition: int, offset: int) -> None:
        found = self.partitions.get((topic, partition))
        if found is not None:
            found.done(offset)

    def position(self, topic: str, partition: int) -> int | None:
        found = self.partitions.get((topic, partition))
        return None if found is None else found.next

    def to_commit(self) -> dict[tuple[str, int], int]:
        """Committable offsets that moved past what was last marked committed."""
        out = {}
        for tp, offsets in self.partitions.items():
            offset = offsets.committable()
            if offset is not None and offset > self.committed.get(tp, -1):
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[tuple[str, int], int]) -> None:
        self.committed.update(offsets)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions this worker no longer reads: their open offsets are another worker's
        to serve again."""
        for tp in partitions:
            self.partitions.pop(tp, None)
            self.committed.pop(tp, None)
