"""Weights kept as logarithms, so millions of multiplicative updates neither overflow nor
underflow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A weight below exp(-FLOOR) of the best is held there: far enough to be negligible, near
# enough that the arm can come back when the others degrade.
LOG_FLOOR = 30.0


def normalise(logw: np.ndarray) -> np.ndarray:
    """Shift so the largest log-weight is 0 and clip the rest to the floor (in place)."""
    if logw.size:
        logw -= logw.max()
        np.maximum(logw, -LOG_FLOOR, out=logw)
    return logw


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


def resized(logw: np.ndarray, n: int, keep: list[int | None]) -> np.ndarray:
    """Log-weights for a new arm list: ``keep[j]`` is the old index of new arm j, or None
    for a new arm, which starts at the mean log-weight of the old ones."""
    start = float(logw.mean()) if logw.size else 0.0
    out = np.array([logw[k] if k is not None else start for k in keep], dtype=np.float64)
    assert out.size == n
    return normalise(out)
