"""The query path's side of partitions moving between workers (worker.handover decides
which): predictions of a revoked partition are held while it is frozen, emitted if it is
assigned here again (thaw) or forgotten with its pending queries if it is given up
(drop), and the predictions already made for a partition taken over are restored into
the memories of answered ids and answers (worker.dedup reads them)."""

from __future__ import annotations

from clipstream.models.control.registry import Registry
from clipstream.selection import LEARNING
from clipstream.streams.wire import topics
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.answers import AnswerMemory, EmittedIds, Remembered
from clipstream.streams.worker.offsets import Offsets
from clipstream.streams.worker.pending import Pending, PendingQueries
from clipstream.streams.worker.predictions import Predictions


class PartitionMoves:
    def __init__(
        self,
        registry: Registry,
        *,
        sensor: Sensor,
        offsets: Offsets,
        pending: PendingQueries,
        emitted: EmittedIds,
        memory: AnswerMemory,
        predictions: Predictions,
    ) -> None:
        self.registry = registry
        self.sensor = sensor
        self.offsets = offsets
        self.pending = pending
        self.emitted = emitted
        self.memory = memory
        self._emit = predictions.emit
        #: partitions being handed over in a rebalance: nothing of theirs is emitted until
        #: they are assigned again (thaw) or given up (drop); changed in place only, as the
        #: answer join holds the same set
        self.frozen: set[int] = set()
        self._held: list[Pending] = []

    def hold(self, p: Pending) -> None:
        """A query of a frozen partition whose deadline passed: answered on thaw."""
        self._held.append(p)

    def freeze(self, partitions: set[int]) -> None:
        """Partitions revoked in a rebalance: hold their predictions until they are either
        assigned here again or given up (another worker may answer them meanwhile)."""
        self.frozen |= partitions

    def thaw(self, partitions: set[int], now: int) -> None:
        """Frozen partitions assigned here again: emit what they held."""
        self.frozen -= partitions
        held = [p for p in self._held if p.partition in partitions]
        self._held = [p for p in self._held if p.partition not in partitions]
        for p in held:
            self.sensor.on_deadline_miss(p.app)
            self._emit(p, now)
        for p in self.pending.values():
            if p.partition in partitions and p.complete:
                self.pending.pop(p.query_id)
                self._emit(p, now)

    def drop(self, partitions: set[int]) -> int:
        """Partitions given up: forget their unanswered queries without marking them done
        (their next owner reads them again); their late answers are ignored."""
        self.frozen -= partitions
        gone = [p for p in self.pending.values() if p.partition in partitions]
        for p in gone:
            self.pending.pop(p.query_id)
        dropped = len(gone) + sum(p.partition in partitions for p in self._held)
        self._held = [p for p in self._held if p.partition not in partitions]
        self.offsets.forget(
            (topic, p)
            for topic in (topics.QUERIES, topics.FEEDBACK, topics.RESPONSES, topics.OBSERVATIONS)
            for p in partitions
        )
        return dropped

    def restore(self, found: list[tuple[str, int, Remembered | None]]) -> None:
        """Predictions read back from the predictions topic (worker.dedup), oldest first,
        each with the time it was emitted: never answer these ids again, and keep the
        answers feedback needs (both memories keep the newest, held or restored)."""
        self.emitted.restore((qid, at_us) for qid, at_us, _ in found)
        self.memory.restore(
            [(qid, r) for qid, _, r in found if r is not None and self._learns(r.app)]
        )

    def _learns(self, app: str) -> bool:
        spec = self.registry.app(app)
        return bool(spec and spec["policy"] in LEARNING)
