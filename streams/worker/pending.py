"""Queries waiting for their models' answers, and the deadlines that end the wait."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Answer:
    model: str
    version: int
    label: str | None
    scores: np.ndarray | None
    classes: list[str]
    error: str | None = None
    cache_hit: bool = False

    @property
    def score(self) -> float | None:
        if self.scores is None or self.scores.size == 0:
            return None
        if self.label is not None and self.classes:
            try:
                return float(self.scores[self.classes.index(self.label)])
            except ValueError:
                pass
        return float(np.max(self.scores))


@dataclass(slots=True)
class Pending:
    query_id: str
    app: str
    user: str | None
    key: str
    partition: int
    offset: int
    sent_at_us: int
    intake_us: int
    #: when the query is answered with what has arrived (its deadline less the emit margin)
    deadline_us: int
    features: list[float]
    #: per consulted model: its Exp3 probability or Exp4 weight
    probs: dict[str, float]
    versions: dict[str, int] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)
    #: whether feedback can teach the app anything (its answers are remembered)
    learns: bool = False

    @property
    def complete(self) -> bool:
        return len(self.answers) == len(self.probs)


class PendingQueries:
    """Pending queries by id, with a heap of deadlines.

    Answered queries leave their heap entry behind (removing it would cost a heap search);
    once stale entries outnumber live ones the heap is rebuilt, so it stays within twice
    the number of pending queries however long their deadlines are."""

    def __init__(self) -> None:
        self._by_id: dict[str, Pending] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, qid: str) -> bool:
        return qid in self._by_id

    def get(self, qid: str) -> Pending | None:
        return self._by_id.get(qid)

    def values(self) -> list[Pending]:
        return list(self._by_id.values())

    def add(self, p: Pending) -> None:
        self._by_id[p.query_id] = p
        heapq.heappush(self._heap, (p.deadline_us, p.query_id))
        if len(self._heap) > 2 * len(self._by_id) + 1024:
            self._heap = [(q.deadline_us, q.query_id) for q in self._by_id.values()]
            heapq.heapify(self._heap)

    def pop(self, qid: str) -> Pending | None:
        return self._by_id.pop(qid, None)

    def expired(self, now_us: int) -> list[Pending]:
        """Pending queries whose deadline passed, removed from here."""
        heap, by_id = self._heap, self._by_id
        out = []
        while heap and heap[0][0] <= now_us:
            _, qid = heapq.heappop(heap)
            p = by_id.pop(qid, None)
            if p is not None:
                out.append(p)
        return out

    def next_deadline(self) -> int | None:
        heap, by_id = self._heap, self._by_id
        while heap and heap[0][1] not in by_id:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def heap_size(self) -> int:
        return len(self._heap)
