"""The feedback join: a feedback record meets the answers its query got (the answer
memory of the worker that answered it) and becomes an observation, sent one message per
observations partition to the owner of its selection key (learning.learner); feedback
that cannot be joined is dead-lettered with the reason.

Feedback can come before its answer (a client that knows the label at once, a query still
waiting for a slow model): it is parked until the query is answered, at its deadline at the
latest, and the rest of its partition waits behind it, because observations of one
feedback partition must go out in offset order (the learner skips any at or below the
highest offset it applied)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from clipstream.models.control.registry import Registry
from clipstream.selection import LEARNING
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.sensors import UNKNOWN, Sensor
from clipstream.streams.worker.answers import AnswerMemory, EmittedIds
from clipstream.streams.worker.emit import Emitter, Source
from clipstream.streams.worker.inputs import Inputs, MessageLike, app_label
from clipstream.streams.worker.offsets import Offsets
from clipstream.streams.worker.pending import PendingQueries

#: per observations partition: the observations made, and the feedback they finish
Made = dict[int, tuple[list[dict[str, Any]], list[Source]]]


class FeedbackJoin:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        sensor: Sensor,
        offsets: Offsets,
        emitter: Emitter,
        emitted: EmittedIds,
        memory: AnswerMemory,
        inputs: Inputs,
        pending: PendingQueries,
    ) -> None:
        self.partitions = settings.partitions
        self.pending = pending
        #: per feedback partition, feedback waiting for its query's answer (the first) and
        #: the feedback read after it
        self.parked: dict[int, deque[tuple[MessageLike, dict[str, Any]]]] = {}
        self.registry = registry
        self.sensor = sensor
        self.offsets = offsets
        self.emitter = emitter
        self.emitted = emitted
        self.memory = memory
        self.inputs = inputs

    def on_feedback(self, messages: Iterable[MessageLike], now: int) -> None:
        """Join each feedback record to its query's answers; the observations go out one
        message per observations partition (their owners fold them: learning.learner)."""
        made: Made = {}

        def feedback(msg: MessageLike, now: int) -> None:
            self._feedback(msg, now, made)

        self.inputs.each(messages, now, feedback, topics.FEEDBACK, "feedback")
        self._send(made)

    def unpark(self, now: int) -> None:
        """Join the parked feedback whose query has been answered since, in order."""
        if not self.parked:
            return
        made: Made = {}
        for partition in list(self.parked):
            queue = self.parked[partition]
            while queue and queue[0][1]["query_id"] not in self.pending:
                msg, fb = queue.popleft()
                try:
                    self._join(msg, fb, now, made)
                except Exception as exc:  # as Inputs.each: one record must not stop the rest
                    self.inputs.dead_letter(
                        topics.FEEDBACK, msg, f"internal error: {exc!r}", "feedback"
                    )
            if not queue:
                del self.parked[partition]
        self._send(made)

    def drop(self, partitions: set[int]) -> None:
        """Partitions given up: their parked feedback is read again by their next owner."""
        for partition in partitions:
            self.parked.pop(partition, None)

    def _send(self, made: Made) -> None:
        observed: dict[str, int] = {}
        for partition, (records, sources) in made.items():
            self.emitter.observations(partition, records, sources)
            for record in records:
                observed[record["app"]] = observed.get(record["app"], 0) + 1
        for app_name, n in observed.items():
            self.sensor.on_feedback(app_name, "observed", n)

    def _feedback(self, msg: MessageLike, now: int, made: Made) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.offsets.read(topics.FEEDBACK, partition, offset)
        fb = self.inputs.decode("Feedback", msg, topics.FEEDBACK, "feedback")
        if fb is None:
            self.sensor.on_feedback(UNKNOWN, "invalid")
            return
        queue = self.parked.get(partition)
        if queue is not None:  # behind feedback that waits for its answer
            queue.append((msg, fb))
            return
        if fb["query_id"] in self.pending:  # not answered yet: at its deadline at the latest
            self.parked[partition] = deque([(msg, fb)])
            return
        self._join(msg, fb, now, made)

    def _join(self, msg: MessageLike, fb: dict[str, Any], now: int, made: Made) -> None:
        partition, offset = msg.partition(), msg.offset()
        app = self.registry.app(fb["app"])
        remembered = self.memory.recall(fb["query_id"], now)
        reason = None
        if app is None:
            reason = f"feedback for unknown app {fb['app']!r}"
        elif fb["label"] is None and fb["reward"] is None:
            reason = "feedback carries neither a label nor a reward"
        elif fb["label"] is None and not 0.0 <= fb["reward"] <= 1.0:  # also NaN
            reason = f"reward must be a number in [0, 1], got {fb['reward']}"
        elif app["policy"] not in LEARNING and fb["query_id"] in self.emitted:
            # nothing to learn for a single-model app: accepted, and done
            self.sensor.on_feedback(fb["app"], "ignored")
            self.offsets.done(topics.FEEDBACK, partition, offset)
            return
        elif remembered is None:
            reason = (
                f"feedback for unknown or expired query {fb['query_id']!r} (feedback must be "
                "keyed by its query's id, like the query, to reach the worker that answered it)"
            )
        elif fb["app"] != remembered.app:  # else it would reshape another app's state
            reason = (
                f"feedback names app {fb['app']!r}; query {fb['query_id']!r} was for app "
                f"{remembered.app!r}"
            )
        if reason is not None:
            self.sensor.on_feedback(app_label(self.registry, fb["app"]), "rejected")
            self.inputs.dead_letter(topics.FEEDBACK, msg, reason, "feedback", fb["query_id"])
            return
        assert remembered is not None
        observation = {
            "key": remembered.key,
            "app": remembered.app,
            "query_id": fb["query_id"],
            "user": remembered.key[len(remembered.app) + 1 :] or None,
            "answers": [
                {"model": m, "label": label, "prob": remembered.probs.get(m, 0.0)}
                for m, label in remembered.labels.items()
            ],
            "label": fb["label"],
            "reward": fb["reward"],
            "feedback_partition": partition,
            "feedback_offset": offset,
            "at_us": now,
        }
        to = topics.partition_for(remembered.key, self.partitions)
        records, sources = made.setdefault(to, ([], []))
        records.append(observation)
        sources.append((topics.FEEDBACK, partition, offset))
