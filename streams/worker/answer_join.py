"""Model answers joined to their queries: each ModelBatchResult's rows go to the pending
queries they answer (the cache keeps them for apps that use it), and a query whose every
consulted model has answered is merged into its prediction at once (worker.predictions),
unless its partition is frozen in a handover."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from clipstream.models.control.registry import Registry
from clipstream.streams.wire import topics
from clipstream.streams.wire.sensors import UNKNOWN, Sensor
from clipstream.streams.worker.cache import PredictionCache
from clipstream.streams.worker.dispatch import Dispatcher
from clipstream.streams.worker.inputs import Inputs, MessageLike
from clipstream.streams.worker.intake import as_bytes
from clipstream.streams.worker.offsets import Offsets
from clipstream.streams.worker.pending import Answer, PendingQueries
from clipstream.streams.worker.predictions import Predictions


class AnswerJoin:
    def __init__(
        self,
        registry: Registry,
        *,
        sensor: Sensor,
        offsets: Offsets,
        pending: PendingQueries,
        dispatch: Dispatcher,
        cache: PredictionCache,
        frozen: set[int],
        inputs: Inputs,
        predictions: Predictions,
        counts: dict[str, int],
    ) -> None:
        self.registry = registry
        self.sensor = sensor
        self.offsets = offsets
        self.pending = pending
        self.dispatch = dispatch
        self.cache = cache
        #: shared with worker.partition_moves, which changes it in place
        self.frozen = frozen
        self.inputs = inputs
        self._emit = predictions.emit
        self.counts = counts

    def on_results(self, messages: Iterable[MessageLike], now: int) -> None:
        self.inputs.each(messages, now, self._result, topics.RESPONSES, "merge")

    def _result(self, msg: MessageLike, now: int) -> None:
        partition, offset = msg.partition(), msg.offset()
        # an answer needs nothing delivered: a worker taking over sends its own batches
        self.offsets.read(topics.RESPONSES, partition, offset)
        self.offsets.done(topics.RESPONSES, partition, offset)
        result = self.inputs.decode("ModelBatchResult", msg, topics.RESPONSES, "merge")
        if result is None:
            return
        model = result["model"]
        malformed = malformed_result(result)
        if malformed is not None:
            self.dispatch.release(result["batch_id"])  # its queries end at their deadline
            self.inputs.dead_letter(topics.RESPONSES, msg, malformed, "merge")
            return
        self.dispatch.answered(result["batch_id"], model, float(result["model_us"]), now)
        classes = list(result["classes"])
        qids = result["query_ids"]
        n = len(qids)
        scores = (
            np.frombuffer(result["scores"], dtype="<f8").reshape(n, -1)
            if result["scores"] and n
            else None
        )
        if scores is not None and not scores.shape[1]:
            scores = None
        labels, errors, version = result["labels"], result["errors"], result["version"]
        pending, late = self.pending, 0
        for i, qid in enumerate(qids):
            p = pending.get(qid)
            if p is None or model not in p.probs or model in p.answers:
                late += 1  # after its deadline, or not asked of this model (stray, forged)
                continue
            answer = Answer(
                model,
                version,
                labels[i],
                None if scores is None else scores[i],
                classes,
                errors[i],
            )
            if answer.error is None and model in p.versions and self._caches(p.app):
                cached = Answer(model, version, answer.label, answer.scores, classes, None, True)
                self.cache.put(self.cache.key(model, version, as_bytes(p.features)), cached)
            p.answers[model] = answer
            if p.complete and p.partition not in self.frozen:
                pending.pop(qid)
                self._emit(p, now)
        if late:
            self.counts["late_answers"] += late
            self.sensor.on_late_answers(
                model if self.registry.model(model) is not None else UNKNOWN, late
            )

    def _caches(self, app: str) -> bool:
        spec = self.registry.app(app)
        return bool(spec and spec["cache"])


def malformed_result(result: Mapping[str, Any]) -> str | None:
    """Why a decoded ModelBatchResult cannot be joined to its queries, or None."""
    n = len(result["query_ids"])
    if len(result["labels"]) != n or len(result["errors"]) != n:
        return (
            f"malformed ModelBatchResult from {result['model']}: {n} query ids, "
            f"{len(result['labels'])} labels, {len(result['errors'])} errors"
        )
    size = len(result["scores"])
    if size % 8 or (n and (size // 8) % n) or (size and not n):
        return (
            f"malformed ModelBatchResult from {result['model']}: {size} bytes of scores, {n} rows"
        )
    return None
