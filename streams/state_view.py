"""Every worker's read side of the selection state.

Each selection key has one writer (streams.learning: the worker owning the key's
partition of clipstream.observations), which writes the key's state to the selection
table's changelog. Every worker tails that changelog and chooses models from the states
it holds, so all workers choose from the same weights, a changelog write later than the
owner: the staleness is measured (``Sensor.on_state_staleness``) and documented.

The view keeps every key's serialised state (as the changelog does) and a bounded number
of decoded ones; a key never written is a fresh state of its app. The keys this worker
writes are its own: the writer puts each state it writes here at once (the very object it
folds into, so this worker chooses from its latest weights), and their records read back
from the changelog are skipped (nothing there is newer)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from selection import SelectionState
from streams import topics
from streams.config import Settings
from streams.kafka_util import FETCH_WAIT_MS
from streams.sensors import Sensor

log = logging.getLogger("clipstream.state")


class StateView:
    def __init__(self, decoded_capacity: int = 100_000, sensor: Sensor | None = None) -> None:
        self.decoded_capacity = decoded_capacity
        self.sensor = sensor or Sensor()
        self._raw: dict[str, bytes] = {}
        self._decoded: OrderedDict[str, SelectionState] = OrderedDict()
        self._own: set[str] = set()

    def __len__(self) -> int:
        return len(self._raw)

    def apply(self, key: str, value: bytes | None) -> None:
        """A changelog record: the key's new state (None: deleted)."""
        if key in self._own:
            return
        if value is None:
            self._raw.pop(key, None)
        else:
            self._raw[key] = value
        self._decoded.pop(key, None)

    def wrote(self, key: str, value: bytes, state: SelectionState) -> None:
        """This worker wrote ``state`` (serialised: ``value``) as the key's state."""
        self._own.add(key)
        self._raw[key] = value
        self._decoded[key] = state
        self._decoded.move_to_end(key)
        if len(self._decoded) > self.decoded_capacity:
            self._decoded.popitem(last=False)

    def disown(self) -> None:
        """This worker's keys may be another's now: the changelog is the truth again."""
        self._own.clear()

    def state_for(self, key: str, app: Mapping[str, Any]) -> SelectionState:
        decoded = self._decoded
        state = decoded.get(key)
        if state is None:
            state = decoded[key] = SelectionState.following(self.stored(key), app)
            if len(decoded) > self.decoded_capacity:
                decoded.popitem(last=False)
        else:
            decoded.move_to_end(key)
            if state.policy != app["policy"] or state.models != app["models"]:
                state = decoded[key] = SelectionState.following(state, app)
        return state

    def stored(self, key: str) -> SelectionState | None:
        """The key's last state read from the changelog (or written here), decoded anew."""
        raw = self._raw.get(key)
        if raw is None:
            return None
        try:
            return SelectionState.from_state(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            # not a state this release wrote: choose from a fresh one rather than fail
            log.error("selection state of %r unreadable (%s): using a fresh one", key, exc)
            return None


class ChangelogTail:
    """Reads the selection table's changelog, all partitions, into a StateView."""

    def __init__(self, settings: Settings, view: StateView) -> None:
        self.view = view
        #: partition -> the offset after the last record read
        self.position: dict[int, int] = {}
        self.consumer = Consumer(
            settings.kafka(
                **{
                    # assign(), never subscribe(): every worker reads every partition
                    "group.id": f"clipstream-state-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": False,
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                }
            )
        )
        md = self.consumer.list_topics(topics.SELECTION_CHANGELOG, timeout=30)
        self.partitions = sorted(md.topics[topics.SELECTION_CHANGELOG].partitions)
        self.consumer.assign(
            [
                TopicPartition(topics.SELECTION_CHANGELOG, p, OFFSET_BEGINNING)
                for p in self.partitions
            ]
        )

    def catch_up(self, timeout: float = 60.0) -> int:
        """Read up to the changelog's end as of now (a restarted worker chooses from the
        weights it had); returns the number of records read."""
        ends = self.end_offsets(self.partitions, timeout)
        read = 0
        deadline = time.monotonic() + timeout
        while not self.caught_up(ends) and time.monotonic() < deadline:
            for msg in self.consumer.consume(1000, 0.2):
                if msg.error() is None:
                    self._apply(msg)
                    read += 1
        if not self.caught_up(ends):
            raise TimeoutError(f"selection changelog not read to its end in {timeout}s")
        return read

    def drain(self) -> int:
        """Apply what has arrived, without waiting."""
        msgs = self.consumer.consume(500, 0)
        now_ms = time.time() * 1000
        for msg in msgs:
            if msg.error() is None:
                self._apply(msg)
                written = msg.timestamp()[1]
                if written > 0:
                    self.view.sensor.on_state_staleness(max(0.0, now_ms - written) / 1000)
        return len(msgs)

    def end_offsets(self, partitions: list[int], timeout: float = 5.0) -> dict[int, int]:
        """How far to read these changelog partitions to hold what was written to them
        until now (asked of the broker; safe from any thread); TimeoutError or
        KafkaException if the broker does not answer."""
        ends = {}
        for p in partitions:
            got = self.consumer.get_watermark_offsets(
                TopicPartition(topics.SELECTION_CHANGELOG, p), timeout=timeout, cached=False
            )
            if got is None:
                raise TimeoutError(f"no end offset of {topics.SELECTION_CHANGELOG}[{p}]")
            low, high = got
            ends[p] = high if high > low else 0  # empty (or compacted away): nothing to read
        return ends

    def caught_up(self, ends: Mapping[int, int]) -> bool:
        """Every record below these end offsets has been read."""
        return all(self.position.get(p, 0) >= end for p, end in ends.items())

    def _apply(self, msg: Any) -> None:
        self.position[msg.partition()] = msg.offset() + 1
        key = msg.key()
        if key is None:
            return
        self.view.apply(key.decode("utf-8", "replace"), msg.value())

    def close(self) -> None:
        self.consumer.close()
