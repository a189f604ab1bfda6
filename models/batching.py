"""Clipper's adaptive batching (NSDI'17 section 4.3): an AIMD batch-size limit per model,
and delayed batching (a short window in which a batch may fill)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BatchWindow:
    max_wait_us: float


def should_flush(pending: int, max_batch: int, oldest_age_us: float, window: BatchWindow) -> bool:
    return pending > 0 and (pending >= max_batch or oldest_age_us >= window.max_wait_us)


class Batcher(Generic[T]):
    """Items waiting for one model; hands out batches of at most the controller's limit."""

    def __init__(self, controller: AIMDController, window: BatchWindow) -> None:
        self.controller = controller
        self.window = window
        self._items: list[T] = []
        self._oldest_us: float | None = None

    @property
    def pending(self) -> int:
        return len(self._items)

    @property
    def next_due_us(self) -> float | None:
        if self._oldest_us is None:
            return None
        return self._oldest_us + self.window.max_wait_us

    def add(self, item: T, now_us: float) -> None:
        if not self._items:
            self._oldest_us = now_us
        self._items.append(item)

    def due(self, now_us: float) -> list[T] | None:
        """A batch if one is full or the oldest item has waited out the window."""
        age = 0.0 if self._oldest_us is None else now_us - self._oldest_us
        if should_flush(len(self._items), self.controller.max_batch, age, self.window):
            return self.flush()
        return None

    def retain(self, keep: Callable[[T], bool]) -> int:
        """Drop the waiting items ``keep`` rejects (e.g. queries already answered at their
        deadline), so a model that cannot keep up does not grow this queue without bound;
        returns how many were dropped."""
        before = len(self._items)
        self._items = [item for item in self._items if keep(item)]
        if not self._items:
            self._oldest_us = None
        return before - len(self._items)

    def flush(self) -> list[T]:
        """Up to one batch of the waiting items, oldest first. Items left behind keep the
        oldest arrival time: they have waited at least that long already."""
        size = self.controller.max_batch
        batch, self._items = self._items[:size], self._items[size:]
        if not self._items:
            self._oldest_us = None
        return batch
