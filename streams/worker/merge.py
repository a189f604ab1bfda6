"""One prediction from a query's answers: the model's, a weighted ensemble of those that
came (Clipper's straggler mitigation), or the app's default output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from clipstream.selection import combine
from clipstream.streams.worker.pending import Answer, Pending

NO_ANSWER = "no answer by the deadline"


def prediction(p: Pending, app: Mapping[str, Any] | None, now: int) -> tuple[dict, str]:
    """The Prediction record for ``p`` and its outcome (model | partial | cache | default).

    A model that did not answer is recorded as such (a loss when feedback comes)."""
    answers = p.answers
    for model in p.probs:
        if model not in answers:
            answers[model] = Answer(model, p.versions.get(model, 0), None, None, [], NO_ANSWER)
    answered = {m: a for m, a in answers.items() if a.error is None and a.label is not None}
    error = None
    if len(answered) == 1:
        (a,) = answered.values()
        label, score = a.label, a.score
    elif answered:
        names = list(answered)
        merged = combine(
            [answered[m].label for m in names],
            [answered[m].scores for m in names],
            [answered[m].classes for m in names],
            np.array([p.probs[m] for m in names], dtype=float),
        )
        label, score = merged.label, merged.confidence
    else:
        label, score = (app or {}).get("default_label"), None
        errors = sorted({a.error for a in answers.values() if a.error})
        error = "; ".join(errors) if errors else None
    cache_hit = bool(answered) and all(a.cache_hit for a in answered.values())
    if not answered:
        outcome = "default"
    elif cache_hit:
        outcome = "cache"
    else:
        outcome = "model" if len(answered) == len(p.probs) else "partial"
    record = {
        "query_id": p.query_id,
        "app": p.app,
        "user": p.user,
        "label": label,
        "score": score,
        "models": [f"{m}@{a.version}" for m, a in answered.items()],
        "answers": [
            {
                "model": m,
                "version": a.version,
                "label": a.label,
                "score": a.score,
                "prob": float(p.probs.get(m, 0.0)),
                "error": a.error,
                "cache_hit": a.cache_hit,
            }
            for m, a in answers.items()
        ],
        "cache_hit": cache_hit,
        "default": not answered,
        "error": error,
        "sent_at_us": p.sent_at_us,
        "emitted_at_us": now,
        "worker_us": now - p.intake_us,
    }
    return record, outcome


def error_prediction(q: Mapping[str, Any], reason: str, now: int) -> dict:
    """The prediction for a query that cannot be served (bad input, unknown app)."""
    return {
        "query_id": q["query_id"],
        "app": q["app"],
        "user": q["user"],
        "label": None,
        "score": None,
        "models": [],
        "answers": [],
        "cache_hit": False,
        "default": False,
        "error": reason,
        "sent_at_us": q["sent_at_us"],
        "emitted_at_us": now,
        "worker_us": 0,
    }


def model_answers(prediction: Mapping[str, Any]) -> tuple[dict[str, str | None], dict[str, float]]:
    """Each consulted model's label (None where it failed) and probability, as a Prediction
    record carries them: what feedback needs to update the selection state."""
    answers = prediction["answers"]
    labels = {a["model"]: (a["label"] if a["error"] is None else None) for a in answers}
    return labels, {a["model"]: a["prob"] for a in answers}
