"""Learning from feedback, with one writer per selection key.

Feedback reaches the worker that answered its query (the query's partition: the SDK keys
a query and its feedback by the query id). That worker joins the feedback with the query's
answers from its answer memory into an ``Observation`` for the selection key
(clipstream.streams.worker.pipeline). All observations of one key land on one partition of
clipstream.observations, those of one batch of feedback in one message for each partition
(an ``ObservationBatch``: at a steady rate one Kafka message per observation cost the
worker more than the fold); the serving group's member assigned that partition number (the
range assignor gives it with the same numbers of the queries and feedback) is the key's
one writer: it folds them into the key's state in log order and writes the state to the
selection table's changelog, the same partition number (``ChangelogStore``). Every worker
reads that changelog (learning.state_view). ``clipstream replay`` folds the same log with
the same ``fold``, so the live state and the replayed one are equal bit for bit.

Applying an observation twice is harmless: each state remembers the last feedback offset
it applied per feedback partition, and a worker re-reading feedback after a crash makes
the same observations again in the same order."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from clipstream.models.control.registry import Registry
from clipstream.selection import SelectionState
from clipstream.streams.learning.state_view import StateView
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker.emit import Emitter

log = logging.getLogger("clipstream.learning")

#: (key, value, partition, offset) of one clipstream.observations record
Record = tuple[bytes | None, bytes | None, int, int]
#: (partition, offset) of one clipstream.observations record
Observed = tuple[int, int]
#: an observation inside a message that could not be folded: (its selection key, the
#: observation as a record of its own, partition, offset of the message, the reason)
Rejected = tuple[bytes, bytes, int, int, str]
#: what folding needs of an observation, flat: selection key, app, models, their labels,
#: their probabilities, label, reward, feedback partition, feedback offset (tuples of plain
#: values, which the collector stops tracking: clipstream.streams.runtime.heap)
Flat = tuple[
    str,
    str,
    tuple[str, ...],
    tuple[str | None, ...],
    tuple[float, ...],
    str | None,
    float | None,
    int,
    int,
]
#: what clipstream.observations holds: this release writes batches, older ones wrote one
#: observation a message, and replays write snapshots
KINDS = ("ObservationBatch", "Observation", "SelectionSnapshot")


class StateStore(Protocol):
    """Where the learner's states are kept: the selection table."""

    def stored(self, key: str) -> SelectionState | None:
        """The key's last written state, or None if it was never written."""

    def write(
        self,
        states: Mapping[str, SelectionState],
        observed: list[Observed],
        rejected: list[Rejected],
    ) -> None:
        """Write these states, and dead-letter the observations rejected; the messages
        folded into them are done (their offsets may be committed) once every write and
        every dead letter is safely stored."""


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


def observations_in(kind: str, record: Mapping[str, Any], key: str | None) -> list[Any]:
    """The observations a decoded message holds, in log order: a batch's, or the one a
    message of an older release held (``key``: that message's key)."""
    if kind == "ObservationBatch":
        return list(record["observations"])
    return [dict(record, key=key)] if kind == "Observation" else []


def observations_of_message(key: str | None, value: bytes | None) -> list[Any]:
    """The observations one message of clipstream.observations holds, decoded: none for
    a replay's snapshot or bytes that are not observations."""
    kind = codec.kind_of(value, ("ObservationBatch", "Observation"))
    return [] if kind is None else observations_in(kind, codec.decode(kind, value), key)


def flatten(observation: Mapping[str, Any]) -> Flat:
    answers = observation["answers"]
    return (
        observation["key"],
        observation["app"],
        tuple([a["model"] for a in answers]),
        tuple([a["label"] for a in answers]),
        tuple([a["prob"] for a in answers]),
        observation["label"],
        observation["reward"],
        observation["feedback_partition"],
        observation["feedback_offset"],
    )


def unflatten(flat: Flat) -> dict[str, Any]:
    """An observation ``Learner.made`` kept, as ``fold`` reads a decoded one."""
    key, app, models, labels, probs, label, reward, partition, offset = flat
    return {
        "key": key,
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
        """``dead_letter``: called with a message that holds nothing to fold, and why (the
        message is done once its dead letter is delivered)."""
        self.store = store
        self.registry = registry
        self.sensor = sensor or Sensor()
        self.dead_letter = dead_letter or (lambda record, reason: log.error("%s", reason))
        #: decoded states of the keys written here (the table holds them serialised)
        self.states: dict[str, SelectionState] = {}
        # recent messages per partition: what a replayed snapshot is brought up to date with
        # (the observations that arrived while the replay ran); kept encoded, as flat tuples
        # the collector does not track (runtime.heap), and decoded in the rare install
        self.recent: dict[int, deque[tuple[int, str | None, bytes]]] = {}
        self.recent_size = recent
        # messages this worker made for a partition it folds, by their bytes: read back,
        # they need no decoding (with two workers half of them, 5 us an observation);
        # bounded, as one whose produce failed is never read back
        self._made: dict[bytes, tuple[Flat, ...]] = {}
        self.made_size = made
        self.counts = {"applied": 0, "replayed": 0, "snapshot": 0, "invalid": 0}
        #: keys folded into and not yet written to the table
        self._dirty: dict[str, SelectionState] = {}
        #: messages read since the last flush (applied, or found applied before)
        self._observed: list[Observed] = []
        #: observations of those messages that could not be folded
        self._rejected: list[Rejected] = []

    @property
    def unwritten(self) -> int:
        """Messages read and not yet handed to the store."""
        return len(self._observed)

    def drop(self) -> None:
        """Partitions taken away without a revocation: their next owner may be writing
        already, so what was folded here is not written (nor its observations done: they
        are read again)."""
        self._dirty.clear()
        self._observed.clear()
        self._rejected.clear()
        self.states.clear()
        self.recent.clear()
        self._made.clear()

    def made(self, value: bytes, observations: list[Mapping[str, Any]]) -> None:
        """This worker produced ``observations`` as ``value`` to a partition it folds."""
        made = self._made
        made[value] = tuple([flatten(o) for o in observations])
        if len(made) > self.made_size:
            del made[next(iter(made))]

    def apply(self, records: Iterable[Record]) -> None:
        """Fold a chunk of messages (in log order); ``flush`` writes what changed."""
        touched = self._dirty
        applied: dict[str, int] = {}
        for record in records:
            read = self._read(record)
            if read is None:
                continue
            kind, found = read
            _, value, partition, offset = record
            self._observed.append((partition, offset))
            if kind == "SelectionSnapshot":
                key, snapshot = found[0]
                try:
                    touched[key] = self._install(key, snapshot, partition, offset)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    self._observed.pop()
                    self.counts["invalid"] += 1
                    self.dead_letter(record, f"invalid selection snapshot: {exc!r}")
                    continue
                self.sensor.on_feedback(snapshot["app"], "snapshot")
                self.counts["snapshot"] += 1
                continue
            any_applied = False
            for key, observation in found:
                app_name = observation["app"]
                app = self.registry.app(app_name)
                if app is None:
                    self._reject(key, observation, partition, offset)
                    continue
                state = self._state(key, app)
                if not fold(state, observation):
                    # done with the next write: the state that has it may not be stored yet
                    self.counts["replayed"] += 1
                    self.sensor.on_feedback(app_name, "replayed")
                    continue
                any_applied = True
                self.counts["applied"] += 1
                applied[app_name] = applied.get(app_name, 0) + 1
                touched[key] = state
            if any_applied and value is not None:
                self._remember(
                    partition, offset, found[0][0] if kind == "Observation" else None, value
                )
        for app_name, n in applied.items():
            self.sensor.on_feedback(app_name, "applied", n)

    def flush(self) -> int:
        """Write each key folded into since the last flush, once: at low rates a fetch holds
        one message, and a write (a changelog record every worker reads) per observation
        cost far more than the fold. Returns the keys written."""
        if not self._observed and not self._dirty:
            return 0
        dirty, self._dirty = self._dirty, {}
        observed, self._observed = self._observed, []
        rejected, self._rejected = self._rejected, []
        self.store.write(dirty, observed, rejected)
        for key, state in dirty.items():
            app_name = key.split("|", 1)[0]
            if key == app_name and self.registry.app(app_name) is not None:
                self.sensor.on_weights(app_name, state.weights())
        return len(dirty)

    def _read(self, record: Record) -> tuple[str, list[tuple[str, Any]]] | None:
        """(kind, [(selection key, observation or snapshot)]) of a message, or None (and a
        dead letter) if it holds nothing to fold."""
        key_bytes, value, _, _ = record
        kept = self._made.pop(value, None) if value is not None else None
        if kept is not None:
            return "ObservationBatch", [(flat[0], unflatten(flat)) for flat in kept]
        kind = codec.kind_of(value, KINDS)
        if kind is None:
            return self._invalid(record, "not an Observation(Batch) or SelectionSnapshot record")
        if kind != "ObservationBatch" and key_bytes is None:
            return self._invalid(record, f"{kind} record without its selection key")
        try:
            decoded = codec.decode(kind, value)
        except codec.DecodeError as exc:
            return self._invalid(record, str(exc))
        if kind == "SelectionSnapshot":
            assert key_bytes is not None
            key = key_bytes.decode("utf-8", "replace")
            if self.registry.app(decoded["app"]) is None:
                return self._invalid(record, f"snapshot for unknown app {decoded['app']!r}")
            return kind, [(key, decoded)]
        key = key_bytes.decode("utf-8", "replace") if key_bytes is not None else None
        return kind, [(o["key"], o) for o in observations_in(kind, decoded, key)]

    def _invalid(self, record: Record, reason: str) -> None:
        self.counts["invalid"] += 1
        self.dead_letter(record, reason)
        return None

    def _reject(
        self, key: str, observation: Mapping[str, Any], partition: int, offset: int
    ) -> None:
        """An observation of an app no longer registered: dead-lettered on its own, as a
        record of its own, when the message's other observations are written."""
        self.counts["invalid"] += 1
        value = codec.encode(
            "Observation", {"user": None, "query_id": "", "at_us": 0, **observation}
        )
        reason = f"observation for unknown app {observation['app']!r}"
        self._rejected.append((key.encode(), value, partition, offset, reason))

    def _state(self, key: str, app: Mapping[str, Any]) -> SelectionState:
        state = self.states.get(key)
        if state is None:
            state = self.store.stored(key)
        state = self.states[key] = SelectionState.following(state, app)
        return state

    def _remember(self, partition: int, offset: int, key: str | None, value: bytes) -> None:
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
                if since < at < offset and k in (None, key):
                    for observation in observations_of_message(k, value):
                        if observation["key"] == key:
                            fold(state, observation)
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

    def write(
        self,
        states: Mapping[str, SelectionState],
        observed: list[Observed],
        rejected: list[Rejected],
    ) -> None:
        records = []
        for key, state in states.items():
            value = state.to_bytes()
            self.view.wrote(key, value, state)
            records.append((key.encode(), value, topics.partition_for(key, self.partitions)))
        self.emitter.states(
            records,
            [(topics.OBSERVATIONS, p, o) for p, o in observed],
            rejected,
        )
