"""Exp3 (Auer et al. 2002), Clipper's single-model selection: sample one model per query,
learn from the loss of the model that was used, importance-weighted by its probability."""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import numpy as np

from clipstream.selection.logweights import normalise, resized, to_probs


class Exp3:
    def __init__(self, n_arms: int, eta: float = 0.1, gamma: float = 0.05) -> None:
        if n_arms < 1:
            raise ValueError("Exp3 needs at least one arm")
        if not 0 <= gamma <= 1:
            raise ValueError("gamma must be in [0, 1]")
        self.eta = float(eta)
        self.gamma = float(gamma)
        # plain floats, not numpy: a handful of arms, updated at the feedback rate and
        # read into a state on every worker, where numpy's per-call overhead cost more
        # than the arithmetic
        self.logw: list[float] = [0.0] * n_arms
        # probabilities and their running sums, computed once per update: a query only
        # samples from them
        self._cumulative: list[float] | None = None
        self._probs: list[float] = []

    @property
    def n_arms(self) -> int:
        return len(self.logw)

    def probabilities(self) -> np.ndarray:
        return np.asarray(self._probabilities())

    def _probabilities(self) -> list[float]:
        keep, spread = 1.0 - self.gamma, self.gamma / self.n_arms
        return [keep * p + spread for p in to_probs(self.logw)]

    def select(self, rng: np.random.Generator) -> tuple[int, float]:
        if self._cumulative is None:
            self._probs = self._probabilities()
            self._cumulative = list(itertools.accumulate(self._probs))
        arm = min(
            bisect.bisect_right(self._cumulative, rng.random() * self._cumulative[-1]),
            self.n_arms - 1,
        )
        return arm, self._probs[arm]

    def update(self, arm: int, loss: float, prob: float) -> None:
        """``loss`` in [0, 1] of ``arm``, chosen with probability ``prob``."""
        loss = min(1.0, max(0.0, float(loss)))
        prob = float(prob)
        prob = prob if prob > 1e-12 else 1e-12  # also NaN: a state must stay finite
        logw = list(self.logw)
        logw[arm] -= self.eta * loss / prob
        self.logw = normalise(logw)
        self._cumulative = None

    def resize(self, keep: list[int | None]) -> None:
        self.logw = resized(self.logw, len(keep), keep)
        self._cumulative = None

    def to_state(self) -> dict[str, Any]:
        return {"eta": self.eta, "gamma": self.gamma, "logw": list(self.logw)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Exp3:
        algo = cls(len(d["logw"]), d["eta"], d["gamma"])
        algo.logw = [float(x) for x in d["logw"]]
        return algo
