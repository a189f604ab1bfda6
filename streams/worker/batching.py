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

    A busy model (a batch of it in flight) gets a batch when one is full or its oldest row
    has waited out the window (``max_wait_us``). An idle model gets its rows at once,
    unless its rows have lately come closer together than ``idle_wait_us``: then its first
    row waits up to that long for a second. At a few hundred queries a second an idle
    model otherwise gets one-row batches, and every batch costs a request, an answer and
    a replica's turn (about 850 us of the replica's CPU for a one-row SVC batch here); the
    wait is about one arrival gap, and at lower rates (gaps longer than the wait) there is
    none. The policy only decides; the queue holds rows and the caller keeps time."""

    def __init__(
        self, controller: AIMDController, max_wait_us: float, idle_wait_us: float = 0.0
    ) -> None:
        self.controller = controller
        self.max_wait_us = float(max_wait_us)
        self.idle_wait_us = float(idle_wait_us)

    def take(
        self, queued: int, oldest_age_us: float, idle: bool, gap_us: float | None = None
    ) -> int:
        """Rows to send now (0: wait). ``gap_us``: the recent gap between the model's rows
        (None: unknown, or the oldest row cannot afford to wait)."""
        if queued <= 0:
            return 0
        limit = self.controller.max_batch
        if queued >= limit:
            return limit
        if idle:
            return 0 if self.idle_waits(queued, oldest_age_us, gap_us) else queued
        return queued if oldest_age_us >= self.max_wait_us else 0

    def idle_waits(self, queued: int, oldest_age_us: float, gap_us: float | None) -> bool:
        """Whether an idle model's lone row waits for a second one."""
        return (
            queued < 2
            and gap_us is not None
            and gap_us < self.idle_wait_us
            and oldest_age_us < self.idle_wait_us
        )

    def due_us(self, oldest_us: float, idle: bool = False) -> float:
        """When a partial batch whose oldest row arrived at ``oldest_us`` is due."""
        return oldest_us + (self.idle_wait_us if idle else self.max_wait_us)


class BatchQueue(Generic[T]):
    """Rows waiting for one model, oldest first, and how closely they have been coming."""

    #: weight of the newest gap in ``gap_us``
    GAP_WEIGHT = 0.2

    def __init__(self) -> None:
        self._items: list[T] = []
        self.oldest_us: float | None = None
        #: the recent gap between rows added (an exponential moving average), in us
        self.gap_us: float | None = None
        self._last_add_us: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def first(self) -> T:
        return self._items[0]

    def add(self, item: T, now_us: float) -> None:
        if not self._items:
            self.oldest_us = now_us
        self._items.append(item)
        last, self._last_add_us = self._last_add_us, now_us
        if last is not None:
            gap = max(0.0, now_us - last)
            self.gap_us = (
                gap
                if self.gap_us is None
                else ((1 - self.GAP_WEIGHT) * self.gap_us + self.GAP_WEIGHT * gap)
            )

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
