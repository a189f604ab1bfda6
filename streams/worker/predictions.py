"""A query's one prediction out: merged from the answers it has (worker.merge), its id
remembered as answered (worker.dedup), its answers kept for its feedback when its app
learns, and produced with the query message it finishes (worker.emit)."""

from __future__ import annotations

from clipstream.models.control.registry import Registry
from clipstream.streams.wire import topics
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker import merge
from clipstream.streams.worker.answers import AnswerMemory, EmittedIds, Remembered
from clipstream.streams.worker.emit import Emitter
from clipstream.streams.worker.pending import Pending


class Predictions:
    def __init__(
        self,
        registry: Registry,
        emitter: Emitter,
        emitted: EmittedIds,
        memory: AnswerMemory,
        sensor: Sensor,
        counts: dict[str, int],
    ) -> None:
        self.registry = registry
        self.emitter = emitter
        self.emitted = emitted
        self.memory = memory
        self.sensor = sensor
        self.counts = counts

    def emit(self, p: Pending, now: int) -> None:
        record, outcome = merge.prediction(p, self.registry.app(p.app), now)
        self.emitted.add(p.query_id, now)
        if p.learns:
            self.memory.keep(
                p.query_id,
                Remembered(
                    p.key,
                    p.app,
                    {m: (a.label if a.error is None else None) for m, a in p.answers.items()},
                    dict(p.probs),
                    p.intake_us,
                ),
            )
        if outcome == "default":
            self.counts["defaults"] += 1
        self.emitter.prediction(record, p.partition, (topics.QUERIES, p.partition, p.offset))
        sent = p.sent_at_us
        self.sensor.on_prediction(
            p.app,
            outcome,
            (now - sent) / 1e6 if sent and abs(now - sent) < 60_000_000 else None,
            (now - p.intake_us) / 1e6,
        )
