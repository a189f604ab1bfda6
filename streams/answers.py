"""What the worker remembers of queries it answered, each with its own bound.

* ``EmittedIds``: the ids already answered, so a redelivered query (after a crash or a
  rebalance) or a late model answer never makes a second prediction (streams.dedup).
* ``AnswerMemory``: each consulted model's answer and weight per answered query of a
  learning app, which turns a feedback record into per-model losses (streams.learning).

Both keep the most recent entries: entries restored from the predictions topic after a
rebalance are older than anything answered live, so they go in at the old end and never
push out a newer entry."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class Remembered:
    """What feedback for an answered query needs."""

    key: str
    app: str
    labels: dict[str, str | None]
    probs: dict[str, float]
    at_us: int


def _insert_old(items: OrderedDict, entries: list[tuple[str, object]], capacity: int) -> int:
    """Put ``entries`` (oldest first) before everything in ``items`` while there is room;
    returns how many went in."""
    added = 0
    for key, value in reversed(entries):
        if len(items) >= capacity:
            break
        if key in items:
            continue
        items[key] = value
        items.move_to_end(key, last=False)
        added += 1
    return added


class EmittedIds:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, qid: str) -> bool:
        return qid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, qid: str) -> None:
        ids = self._ids
        ids[qid] = None
        if len(ids) > self.capacity:
            ids.popitem(last=False)

    def restore(self, qids: Iterable[str]) -> int:
        """Ids read back from the predictions topic, oldest first."""
        return _insert_old(self._ids, [(q, None) for q in qids], self.capacity)


class AnswerMemory:
    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_us = int(ttl_s * 1e6)
        self._items: OrderedDict[str, Remembered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, qid: str, remembered: Remembered) -> None:
        items = self._items
        items[qid] = remembered
        if len(items) > self.capacity:
            items.popitem(last=False)

    def restore(self, entries: list[tuple[str, Remembered]]) -> int:
        """Entries read back from the predictions topic, oldest first."""
        return _insert_old(self._items, entries, self.capacity)  # type: ignore[arg-type]

    def recall(self, qid: str, now_us: int) -> Remembered | None:
        found = self._items.get(qid)
        if found is None:
            return None
        if now_us - found.at_us > self.ttl_us:
            del self._items[qid]
            return None
        return found
