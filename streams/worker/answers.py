"""What the worker remembers of queries it answered, each with its own bound.

* ``EmittedIds``: the ids already answered, so a redelivered query (after a crash or a
  rebalance) or a late model answer never makes a second prediction (worker.dedup).
* ``AnswerMemory``: each consulted model's answer and weight per answered query of a
  learning app, which turns a feedback record into per-model losses (learning.learner).

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


#: a Remembered as the memory holds it: (at_us, key, app, labels' models, labels, probs'
#: models, probs), flat tuples of strings and numbers
Entry = tuple[
    int, str, str, tuple[str, ...], tuple[str | None, ...], tuple[str, ...], tuple[float, ...]
]


def _entry(r: Remembered) -> Entry:
    labels, probs = r.labels, r.probs
    return (
        r.at_us,
        r.key,
        r.app,
        tuple(labels),
        tuple(labels.values()),
        tuple(probs),
        tuple(probs.values()),
    )


class AnswerMemory:
    """Up to ``capacity`` answers (200,000 by default), each a flat tuple of plain values:
    the collector stops tracking such a tuple, so a full collection does not walk them all,
    as it walked every object it held before (28-45 ms a collection once the imports were
    exempt: clipstream.streams.runtime.heap)."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_us = int(ttl_s * 1e6)
        self._items: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, qid: str, remembered: Remembered) -> None:
        items = self._items
        items[qid] = _entry(remembered)
        if len(items) > self.capacity:
            items.popitem(last=False)

    def restore(self, entries: list[tuple[str, Remembered]]) -> int:
        """Entries read back from the predictions topic, oldest first."""
        return _insert_old(self._items, [(q, _entry(r)) for q, r in entries], self.capacity)

    def recall(self, qid: str, now_us: int) -> Remembered | None:
        found = self._items.get(qid)
        if found is None:
            return None
        at_us, key, app, labelled, labels, weighed, probs = found
        if now_us - at_us > self.ttl_us:
            del self._items[qid]
            return None
        return Remembered(
            key,
            app,
            dict(zip(labelled, labels, strict=True)),
            dict(zip(weighed, probs, strict=True)),
            at_us,
        )
