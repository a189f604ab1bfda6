"""Weights kept as logarithms, so millions of multiplicative updates neither overflow nor
underflow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A weight below exp(-FLOOR) of the best is held there: far enough to be negligible, near
# enough that the arm can come back when the others degrade.
LOG_FLOOR = 30.0


def normalise(logw: Sequence[float]) -> list[float]:
    """Log-weights shifted so the largest is 0, the rest clipped to the floor; in plain
    floats, as ``to_probs``, since every update ends here."""
    if not len(logw):
        return []
    top = max(logw)
    return [max(x - top, -LOG_FLOOR) for x in logw]


def to_probs(logw: Sequence[float]) -> list[float]:
    """The normalised weights, in plain floats: a handful of arms, where numpy's per-call
    overhead cost more than the arithmetic (4 us a call, and the weights are computed
    again after every update, at the feedback rate, on every worker)."""
    if not len(logw):
        return []
    top = max(logw)
    w = [math.exp(x - top) for x in logw]
    total = math.fsum(w)
    return [x / total for x in w]


def resized(logw: Sequence[float], n: int, keep: list[int | None]) -> list[float]:
    """Log-weights for a new arm list: ``keep[j]`` is the old index of new arm j, or None
    for a new arm, which starts at the mean log-weight of the old ones (numpy's mean, as
    states resized before were)."""
    start = float(np.mean(logw)) if len(logw) else 0.0
    out = normalise([float(logw[k]) if k is not None else start for k in keep])
    assert len(out) == n
    return out
