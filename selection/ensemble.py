"""Combining several models' answers to one query into one output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Combined:
    label: str | None
    confidence: float
    used: list[int] = field(default_factory=list)


def combine(
    labels: Sequence[str | None],
    scores: Sequence[np.ndarray | None],
    classes: Sequence[Sequence[str]],
    weights: np.ndarray,
) -> Combined:
    """Weighted vote over the models that answered (None entries are stragglers/failures).

    Where a model gave class probabilities they are averaged by class name (models may
    order their classes differently); otherwise its label gets its whole weight. Weights
    are renormalised over the models present. Ties go to the smallest class name, so the
    result does not depend on arrival order."""
    used = [i for i, label in enumerate(labels) if label is not None]
    if not used:
        return Combined(None, 0.0, [])
    # plain floats: a handful of models and classes per query, where numpy's per-call
    # overhead would cost more than the arithmetic
    w = [max(float(weights[i]), 0.0) for i in used]
    total_w = sum(w)
    w = [x / total_w for x in w] if total_w > 0 else [1.0 / len(used)] * len(used)
    votes: dict[str, float] = {}
    for wi, i in zip(w, used, strict=True):
        s, names = scores[i], classes[i]
        if s is not None and len(names) == len(s) and len(names) > 1:
            values = s.tolist() if isinstance(s, np.ndarray) else list(s)
            total = sum(values)
            if total > 0 and min(values) >= 0:
                for name, v in zip(names, values, strict=True):
                    votes[name] = votes.get(name, 0.0) + wi * (v / total)
                continue
        label = labels[i]
        assert label is not None
        votes[label] = votes.get(label, 0.0) + wi
    best = min(votes, key=lambda name: (-votes[name], name))
    return Combined(best, float(votes[best]), used)


def loss_for(label_pred: str | None, truth: str) -> float:
    """0/1 loss; no answer counts as wrong."""
    return 0.0 if label_pred is not None and label_pred == truth else 1.0


def reward_to_loss(reward: float) -> float:
    return 1.0 - min(1.0, max(0.0, float(reward)))
