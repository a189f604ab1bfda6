"""What the worker remembers of queries it answered, each with its own bound.

* ``EmittedIds``: the ids already answered, so a redelivered query (after a crash or a
  rebalance) or a late model answer never makes a second prediction (worker.dedup).
* ``AnswerMemory``: each consulted model's answer and weight per answered query of a
  learning app, which turns a feedback record into per-model losses (learning.learner).

Both keep the most recent entries, by the time each was answered, whoever answered it.
Entries restored from the predictions topic after a rebalance (worker.dedup) are not
simply older than what is held: a worker taking over a crashed one's partitions holds its
own answers from minutes back, and the predecessor's last answers are seconds old. So a
restore merges by time: it keeps the newest ``capacity`` of both, whatever the fill (issue
31: restored entries went in only while there was room, so a full memory took none)."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Remembered:
    """What feedback for an answered query needs."""

    key: str
    app: str
    labels: dict[str, str | None]
    probs: dict[str, float]
    at_us: int


def _restore(
    items: OrderedDict[str, Any],
    entries: list[tuple[str, Any]],
    capacity: int,
    at: Callable[[Any], int],
) -> int:
    """Merge ``entries`` (oldest first) into ``items`` (oldest first) by the time ``at`` of
    each value, then evict the oldest beyond ``capacity``; returns how many of ``entries``
    were kept. Only held entries not older than the oldest restored one are taken out and
    merged back, so a restore of the last seconds costs what those seconds hold."""
    if not entries:
        return 0
    since = at(entries[0][1])
    tail: list[tuple[str, Any]] = []
    while items:
        key, value = items.popitem()
        if at(value) < since:
            items[key] = value  # the newest held entry older than the restore: back at the end
            break
        tail.append((key, value))
    tail.reverse()
    restored = set()
    for key, value in heapq.merge(tail, entries, key=lambda kv: at(kv[1])):
        if key in items:
            continue  # held, or restored twice: once is enough
        items[key] = value
        restored.add(key)
    restored.difference_update(key for key, _ in tail)
    while len(items) > capacity:
        restored.discard(items.popitem(last=False)[0])
    return len(restored)


class EmittedIds:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        #: id -> when it was answered (us)
        self._ids: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, qid: str) -> bool:
        return qid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, qid: str, at_us: int) -> None:
        """``qid`` answered at ``at_us`` (the time a restore merges by)."""
        ids = self._ids
        ids[qid] = at_us
        if len(ids) > self.capacity:
            ids.popitem(last=False)

    def restore(self, answered: Iterable[tuple[str, int]]) -> int:
        """Ids read back from the predictions topic with the time each was answered, oldest
        first; returns how many were kept."""
        return _restore(self._ids, list(answered), self.capacity, _itself)


def _itself(at_us: int) -> int:
    return at_us


def _first(entry: Entry) -> int:
    return entry[0]


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
        """Entries read back from the predictions topic, oldest first; returns how many
        were kept (merged with what is held by ``at_us``)."""
        return _restore(self._items, [(q, _entry(r)) for q, r in entries], self.capacity, _first)

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
