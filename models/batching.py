"""Clipper's adaptive batching (NSDI'17 section 4.3): an AIMD batch-size limit per model,
and delayed batching (a short window in which a batch may fill)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class AIMDController:
    """Additive increase while batches meet the latency objective, multiplicative decrease
    when one misses it. The limit settles just under the largest batch the model serves
    within ``slo_us``.

    One refinement over the paper: a miss shrinks the limit only when batching is what
    made the batch slow, i.e. the batch took well over the latency of a minimal batch.
    A model whose single-row latency already misses the objective (a 100-tree forest on
    a busy machine) gains nothing from tiny batches and loses most of its throughput, so
    for it the limit keeps growing while larger batches cost little more."""

    def __init__(
        self,
        slo_us: float,
        initial: int = 8,
        min_size: int = 1,
        max_size: int = 1024,
        additive: int = 4,
        backoff: float = 0.9,
        batching_cost: float = 1.5,
    ) -> None:
        if not 0 < backoff < 1:
            raise ValueError("backoff must be in (0, 1)")
        if not 1 <= min_size <= max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        self.slo_us = float(slo_us)
        self.min_size = min_size
        self.max_size = max_size
        self.additive = additive
        self.backoff = backoff
        self.batching_cost = batching_cost
        self._max = max(min_size, min(initial, max_size))
        #: latency of small batches (EWMA): the model's fixed cost per call
        self.base_us: float | None = None

    @property
    def max_batch(self) -> int:
        return self._max

    def observe(self, batch_size: int, latency_us: float) -> int:
        """Feed one served batch; returns the new limit."""
        if batch_size <= max(2, self.min_size):
            self.base_us = (
                latency_us if self.base_us is None else 0.8 * self.base_us + 0.2 * latency_us
            )
        batching_made_it_slow = (
            self.base_us is None or latency_us > self.batching_cost * self.base_us
        )
        if latency_us > self.slo_us and batching_made_it_slow:
            # back off from the size that missed, not from the limit (it may be far above)
            self._max = max(self.min_size, int(self.backoff * min(batch_size, self._max)))
        elif batch_size >= self._max:
            self._max = min(self.max_size, self._max + self.additive)
        return self._max


class BatchPolicy:
    """Clipper's delayed batching for one model: how many queued rows to send now.

    Rows go at once to an idle model (nothing of it in flight: waiting would only add
    latency), and to a busy one when a batch is full or its oldest row has waited out the
    window. The policy only decides; the queue holds rows and the caller keeps time."""

    def __init__(self, controller: AIMDController, max_wait_us: float) -> None:
        self.controller = controller
        self.max_wait_us = float(max_wait_us)

    def take(self, queued: int, oldest_age_us: float, idle: bool) -> int:
        """Rows to send now (0: wait)."""
        if queued <= 0:
            return 0
        limit = self.controller.max_batch
        if idle or queued >= limit or oldest_age_us >= self.max_wait_us:
            return min(queued, limit)
        return 0

    def due_us(self, oldest_us: float) -> float:
        """When a partial batch whose oldest row arrived at ``oldest_us`` is due."""
        return oldest_us + self.max_wait_us


class BatchQueue(Generic[T]):
    """Rows waiting for one model, oldest first."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self.oldest_us: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now_us: float) -> None:
        if not self._items:
            self.oldest_us = now_us
        self._items.append(item)

    def take(self, n: int) -> list[T]:
        """The ``n`` oldest rows. Rows left behind keep the oldest arrival time: they have
        waited at least that long already."""
        batch, self._items = self._items[:n], self._items[n:]
        if not self._items:
            self.oldest_us = None
        return batch

    def retain(self, keep: Callable[[T], bool]) -> int:
        """Drop the rows ``keep`` rejects (e.g. queries already answered at their deadline),
        so a model that cannot keep up does not grow this queue without bound; returns how
        many were dropped."""
        before = len(self._items)
        self._items = [item for item in self._items if keep(item)]
        if not self._items:
            self.oldest_us = None
        return before - len(self._items)
