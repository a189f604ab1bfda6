"""Learning from feedback, with one writer per selection key.

Feedback reaches the worker that answered its query (the query's partition: the SDK keys
a query and its feedback by the query id). That worker joins the feedback with the query's
answers from its answer memory into an ``Observation`` keyed by the selection key
(streams.pipeline). All observations of one key land on one partition of
clipstream.observations; the serving group's member assigned that partition number (the
range assignor gives it with the same numbers of the queries and feedback) is the key's
one writer: it folds them into the key's state in log order and writes the state to the
selection table's changelog, the same partition number (``ChangelogStore``). Every worker
reads that changelog (streams.state_view). ``clipstream replay`` folds the same log with
the same ``fold``, so the live state and the replayed one are equal bit for bit.

Applying an observation twice is harmless: each state remembers the last feedback offset
it applied per feedback partition, and a worker re-reading feedback after a crash makes
the same observations again in the same order."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from models.registry import Registry
from selection import SelectionState
from streams import codec, topics
from streams.emit import Emitter
from streams.sensors import UNKNOWN, Sensor
from streams.state_view import StateView

log = logging.getLogger("clipstream.learning")

#: (key, value, partition, offset) of one clipstream.observations record
Record = tuple[bytes | None, bytes | None, int, int]
#: (partition, offset) of one clipstream.observations record
Observed = tuple[int, int]
#: what folding needs of an observation, flat: app, models, their labels, their
#: probabilities, label, reward, feedback partition, feedback offset (tuples of plain values,
#: which the collector stops tracking: streams.heap)
Flat = tuple[
    str,
    tuple[str, ...],
    tuple[str | None, ...],
    tuple[float, ...],
    str | None,
    float | None,
    int,
    int,
]


class StateStore(Protocol):
    """Where the learner's states are kept: the selection table."""

    def stored(self, key: str) -> SelectionState | None:
        """The key's last written state, or None if it was never written."""

    def write(self, states: Mapping[str, SelectionState], observed: list[Observed]) -> None:
        """Write these states; the observations folded into them are done (their offsets
        may be committed) once every write is safely stored."""


def fold(state: SelectionState, observation: Mapping[str, Any]) -> bool:
    """Apply one observation to ``state``; False if it was applied before."""
    partition, offset = observation["feedback_partition"], observation["feedback_offset"]
    if not state.should_apply(partition, offset):
        return False
    answers = observation["answers"]
    state.learn(
        {a["model"]: a["label"] for a in answers},
        observation["label"],
        {a["model"]: a["prob"] for a in answers},
        reward=observation["reward"],
    )
    state.mark_applied(partition, offset)
    return True


def unflatten(flat: Flat) -> dict[str, Any]:
    """An observation ``Learner.made`` kept, as ``fold`` reads a decoded one."""
    app, models, labels, probs, label, reward, partition, offset = flat
    return {
        "app": app,
        "answers": [
            {"model": m, "label": lab, "prob": p}
            for m, lab, p in zip(models, labels, probs, strict=True)
        ],
        "label": label,
        "reward": reward,
        "feedback_partition": partition,
        "feedback_offset": offset,
    }


class Learner:
    """The writer of the selection keys on this worker's observation partitions."""

    def __init__(
        self,
        store: StateStore,
        registry: Registry,
        sensor: Sensor | None = None,
        dead_letter: Callable[[Record, str], None] | None = None,
        recent: int = 10_000,
        made: int = 10_000,
    ) -> None:
        self.store = store
        self.registry = registry
        self.sensor = sensor or Sensor()
        self.dead_letter = dead_letter or (lambda record, reason: log.error("%s", reason))
        #: decoded states of the keys written here (the table holds them serialised)
        self.states: dict[str, SelectionState] = {}
        # recent observations per partition: what a replayed snapshot is brought up to date
        # with (those that arrived while the replay ran); kept encoded, as flat tuples the
        # collector does not track (streams.heap), and decoded in the rare install
        self.recent: dict[int, deque[tuple[int, str, bytes]]] = {}
        self.recent_size = recent
        # observations this worker made for a partition it folds, by their bytes: read
        # back, they need no decoding (with two workers half the observations, 8 us each);
        # bounded, as one whose produce failed is never read back
        self._made: dict[bytes, Flat] = {}
        self.made_size = made
        self.counts = {"applied": 0, "replayed": 0, "snapshot": 0, "invalid": 0}
        #: keys folded into and not yet written to the table
        self._dirty: dict[str, SelectionState] = {}
        #: observations read since the last flush (applied, or found applied before)
        self._observed: list[Observed] = []

    @property
    def unwritten(self) -> int:
        """Observations read and not yet handed to the store."""
        return len(self._observed)

    def drop(self) -> None:
        """Partitions taken away without a revocation: their next owner may be writing
        already, so what was folded here is not written (nor its observations done: they
        are read again)."""
        self._dirty.clear()
        self._observed.clear()
        self.states.clear()
        self.recent.clear()
        self._made.clear()

    def made(self, value: bytes, observation: Mapping[str, Any]) -> None:
        """This worker produced ``observation`` as ``value`` to a partition it folds."""
        made = self._made
        answers = observation["answers"]
        made[value] = (
            observation["app"],
            tuple([a["model"] for a in answers]),
            tuple([a["label"] for a in answers]),
            tuple([a["prob"] for a in answers]),
            observation["label"],
            observation["reward"],
            observation["feedback_partition"],
            observation["feedback_offset"],
        )
        if len(made) > self.made_size:
            del made[next(iter(made))]

    def apply(self, records: Iterable[Record]) -> None:
        """Fold a chunk of observations (in log order); ``flush`` writes what changed."""
        touched = self._dirty
        applied: dict[str, int] = {}
        made = self._made
        for record in records:
            key_bytes, value, partition, offset = record
            flat = made.pop(value, None)
            if flat is not None and key_bytes is not None:
                kind = "Observation"
                decoded = unflatten(flat)
            else:
                kind = codec.kind_of(value, ("Observation", "SelectionSnapshot"))
                if kind is None or key_bytes is None:
                    self.counts["invalid"] += 1
                    self.dead_letter(record, "not an Observation or SelectionSnapshot record")
                    continue
                try:
                    decoded = codec.decode(kind, value)
                except codec.DecodeError as exc:
                    self.counts["invalid"] += 1
                    self.dead_letter(record, str(exc))
                    continue
            key = key_bytes.decode("utf-8", "replace")
            app = self.registry.app(decoded["app"])
            if app is None:
                self.counts["invalid"] += 1
                self.dead_letter(record, f"observation for unknown app {decoded['app']!r}")
                continue
            if kind == "SelectionSnapshot":
                self._observed.append((partition, offset))
                try:
                    state = self._install(key, decoded, partition, offset)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    self.counts["invalid"] += 1
                    self.dead_letter(record, f"invalid selection snapshot: {exc!r}")
                    continue
                self.sensor.on_feedback(decoded["app"], "snapshot")
                self.counts["snapshot"] += 1
            else:
                state = self._state(key, app)
                self._observed.append((partition, offset))
                if not fold(state, decoded):
                    # done with the next write: the state that has it may not be stored yet
                    self.counts["replayed"] += 1
                    self.sensor.on_feedback(decoded["app"], "replayed")
                    continue
                self._remember(partition, offset, key, value)
                self.counts["applied"] += 1
                applied[decoded["app"]] = applied.get(decoded["app"], 0) + 1
            touched[key] = state
        for app_name, n in applied.items():
            label = app_name if self.registry.app(app_name) is not None else UNKNOWN
            self.sensor.on_feedback(label, "applied", n)

    def flush(self) -> int:
        """Write each key folded into since the last flush, once: at low rates a fetch holds
        one observation, and a write (a changelog record every worker reads) per
        observation cost far more than the fold. Returns the keys written."""
        if not self._observed and not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, {}
        observed, self._observed = self._observed, []
        self.store.write(dirty, observed)
        for key, state in dirty.items():
            app_name = key.split("|", 1)[0]
            if key == app_name and self.registry.app(app_name) is not None:
                self.sensor.on_weights(app_name, state.weights())
        return len(dirty)

    def _state(self, key: str, app: Mapping[str, Any]) -> SelectionState:
        state = self.states.get(key)
        if state is None:
            state = self.store.stored(key)
        state = self.states[key] = SelectionState.following(state, app)
        return state

    def _remember(self, partition: int, offset: int, key: str, value: bytes) -> None:
        log_ = self.recent.get(partition)
        if log_ is None:
            log_ = self.recent[partition] = deque(maxlen=self.recent_size)
        log_.append((offset, key, value))

    def _install(
        self, key: str, snapshot: Mapping[str, Any], partition: int, offset: int
    ) -> SelectionState:
        """A replayed state replaces the key's, brought up to date with the observations
        that arrived after those the replay read."""
        state = SelectionState.from_bytes(snapshot["state"])
        since = snapshot["observed_offset"]
        recent = self.recent.get(partition, ())
        if recent and since >= 0 and recent[0][0] > since + 1:
            log.warning(
                "snapshot of %r: observations %d-%d are older than the %d kept; they are "
                "not re-applied",
                key,
                since + 1,
                recent[0][0] - 1,
                len(recent),
            )
        if since >= 0:  # -1: a state from elsewhere (a file), nothing to bring it up to
            for at, k, value in recent:
                if k == key and since < at < offset:
                    fold(state, codec.decode("Observation", value))
        self.states[key] = state
        return state


class ChangelogStore:
    """The selection table as a compacted topic, clipstream-selection-changelog (the name
    and record format of the Faust table it was first: keys the selection keys' UTF-8
    bytes, values the states as JSON). A key's state goes to its observations' partition
    number, produced by the worker's emitter; the observations folded into a flush are done
    once Kafka has every state of that flush. Reads come from the worker's view of the
    changelog, which this writer updates at once (the keys it writes are its own)."""

    def __init__(self, view: StateView, emitter: Emitter, partitions: int) -> None:
        self.view = view
        self.emitter = emitter
        self.partitions = partitions

    def stored(self, key: str) -> SelectionState | None:
        return self.view.stored(key)

    def write(self, states: Mapping[str, SelectionState], observed: list[Observed]) -> None:
        records = []
        for key, state in states.items():
            value = state.to_bytes()
            self.view.wrote(key, value, state)
            records.append((key.encode(), value, topics.partition_for(key, self.partitions)))
        self.emitter.states(records, [(topics.OBSERVATIONS, p, o) for p, o in observed])
