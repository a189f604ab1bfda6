"""Every worker's read side of the selection state.

Each selection key has one writer (clipstream.streams.learning.learner: the worker owning the key's
partition of clipstream.observations), which writes the key's state to the selection
table's changelog. Every worker tails that changelog and chooses models from the states
it holds (clipstream.streams.learning.feed reads it), so all workers choose from the same weights, a
changelog batch later than the owner: the staleness is measured
(``Sensor.on_state_staleness``) and documented.

The view keeps every key's serialised state (as the changelog does) and a bounded number
of decoded ones; a key never written is a fresh state of its app. The keys this worker
writes are its own: the writer puts each state it writes here at once (the very object it
folds into, so this worker chooses from its latest weights), and their records read back
from the changelog are skipped (nothing there is newer)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from clipstream.selection import SelectionState

log = logging.getLogger("clipstream.state")


class StateView:
    def __init__(self, decoded_capacity: int = 100_000) -> None:
        self.decoded_capacity = decoded_capacity
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
            return SelectionState.from_bytes(raw)
        except (ValueError, KeyError, TypeError) as exc:
            # not a state this release wrote: choose from a fresh one rather than fail
            log.error("selection state of %r unreadable (%s): using a fresh one", key, exc)
            return None
