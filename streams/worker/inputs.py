"""What every stage of the query path does with an input message: handle each one on its
own (a message whose handling fails is dead-lettered with the error, the others go on),
decode it, or dead-letter it with its original bytes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from clipstream.models.control.registry import Registry
from clipstream.streams.wire import codec
from clipstream.streams.wire.sensors import UNKNOWN
from clipstream.streams.worker.emit import Emitter

log = logging.getLogger("clipstream.pipeline")


class MessageLike(Protocol):
    """What the pipeline reads of a Kafka message (confluent_kafka.Message has it)."""

    def value(self) -> bytes | None: ...

    def key(self) -> bytes | None: ...

    def partition(self) -> int: ...

    def offset(self) -> int: ...

    def timestamp(self) -> tuple[int, int]: ...


class Inputs:
    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter

    def each(
        self,
        messages: Iterable[MessageLike],
        now: int,
        handle: Callable[[MessageLike, int], None],
        topic: str,
        stage: str,
    ) -> int:
        """``handle`` each message; one message's failure must not stop the others (it is
        dead-lettered with the error). Returns how many there were."""
        n = 0
        for msg in messages:
            n += 1
            try:
                handle(msg, now)
            except Exception as exc:
                log.exception("%s failed for a message of %s", stage, topic)
                self.dead_letter(topic, msg, f"internal error: {exc!r}", stage)
        return n

    def decode(self, kind: str, msg: MessageLike, topic: str, stage: str) -> Any | None:
        """The record a message holds; None (and a dead letter) if it holds none."""
        try:
            return codec.decode(kind, msg.value())
        except codec.DecodeError as exc:
            self.dead_letter(topic, msg, str(exc), stage)
            return None

    def dead_letter(
        self,
        source: str,
        msg: MessageLike,
        reason: str,
        stage: str,
        query_id: str | None = None,
    ) -> None:
        """Bad input: dead-lettered with its bytes, and done once that is delivered."""
        partition, offset = msg.partition(), msg.offset()
        self.emitter.dead_letter(
            source,
            partition,
            offset,
            msg.key(),
            msg.value(),
            reason,
            stage,
            query_id,
            done=(source, partition, offset),
        )


def app_label(registry: Registry, app: str) -> str:
    """The metrics label for an app name from a message: names that are not registered
    share one label, so bad input cannot grow the metrics without bound."""
    return app if registry.app(app) is not None else UNKNOWN
