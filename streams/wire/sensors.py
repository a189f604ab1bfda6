"""What the worker reports about itself, as hooks it calls (the sensor pattern of Faust).

The processing code calls these and never imports a metrics library; ``Sensor`` does
nothing, which is what unit tests and embedded uses get. ``runtime.metrics.Prometheus``
turns them into Prometheus series. App and model names reaching a sensor are already
bounded: names that are not registered arrive as ``UNKNOWN``."""

from __future__ import annotations

from collections.abc import Mapping

#: the label for an app or model name that is not registered
UNKNOWN = "(unknown)"


class Sensor:
    # -- queries ----------------------------------------------------------------------
    def on_queries(self, app: str, n: int) -> None:
        """``n`` queries of ``app`` taken in."""

    def on_intake(self, seconds_per_query: float) -> None:
        """Intake time per query of one fetched chunk."""

    def on_cache(self, model: str, hit: bool) -> None: ...

    def on_prediction(
        self, app: str, outcome: str, end_to_end_s: float | None, worker_s: float
    ) -> None:
        """One prediction produced; outcome: model | partial | cache | default | error."""

    def on_deadline_miss(self, app: str) -> None:
        """A query answered at its deadline without all its models."""

    def on_dead_letter(self, stage: str) -> None: ...

    def on_delivery_failed(self, topic: str, action: str) -> None:
        """A produce that Kafka refused: ``retried`` once, else ``dead_lettered``; or one
        that failed only for a while and cannot be re-sent in order: ``stopped``."""

    def on_commit_failed(self) -> None:
        """A commit of consumed offsets that the broker did not take (the next retries)."""

    # -- batches ----------------------------------------------------------------------
    def on_batch_sent(self, model: str, rows: int) -> None: ...

    def on_batch_answered(self, model: str, model_s: float, batch_max: int) -> None: ...

    def on_late_answers(self, model: str, n: int) -> None:
        """Answers for queries already emitted (or never asked of that model)."""

    def on_hopeless_rows(self, model: str, n: int) -> None:
        """Rows not sent to a busy model because they could not be answered in time."""

    def on_tick(self, pending: int, queued: Mapping[str, int]) -> None:
        """Periodically: queries waiting for answers, rows waiting per model."""

    # -- learning ---------------------------------------------------------------------
    def on_feedback(self, app: str, result: str, n: int = 1) -> None:
        """result: observed | rejected | invalid (query owner); applied | replayed |
        snapshot (selection key owner)."""

    def on_weights(self, app: str, weights: Mapping[str, float]) -> None:
        """Current weights of a non-personalised app's selection state."""

    def on_state_staleness(self, seconds: float) -> None:
        """Time from a selection state's write to this worker reading it."""

    def on_restore(self, seconds: float) -> None:
        """Time to restore answered queries of newly assigned partitions."""

    # -- registry ---------------------------------------------------------------------
    def on_control_refused(self, kind: str) -> None:
        """A control record refused as invalid (models.control.specs); kind: model | app |
        undecodable. The last good spec stays."""
