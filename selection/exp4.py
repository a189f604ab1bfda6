"""Exp4 as Clipper uses it: every model is an expert whose output is combined with its
weight; on feedback each expert's weight is multiplied by exp(-eta * its own loss).

Two choices beyond the textbook:
- An expert that did not answer a query (straggler, failure) is charged the mean loss of
  those that did, so normalisation neither rewards nor punishes it for being absent.
  (Whether a failure is a loss is the caller's decision: SelectionState charges it 1.)
- Fixed share (Herbster & Warmuth): after each update a fraction ``share`` of the total
  weight is spread evenly, so an expert whose weight collapsed can recover quickly when
  the best one degrades mid-stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipstream.selection.logweights import normalise, resized, to_probs


class Exp4:
    def __init__(self, n_experts: int, eta: float = 0.1, share: float = 0.01) -> None:
        if n_experts < 1:
            raise ValueError("Exp4 needs at least one expert")
        if not 0 <= share < 1:
            raise ValueError("share must be in [0, 1)")
        self.eta = float(eta)
        self.share = float(share)
        self.logw: list[float] = [0.0] * n_experts  # plain floats, as Exp3's
        self._weights: list[float] | None = None  # computed once per update

    @property
    def n_experts(self) -> int:
        return len(self.logw)

    def weights(self) -> np.ndarray:
        return np.asarray(self.weight_list())

    def weight_list(self) -> list[float]:
        """The weights as floats, computed once per update (every query reads them)."""
        if self._weights is None:
            self._weights = to_probs(self.logw)
        return self._weights

    def update(
        self, losses: Sequence[float] | np.ndarray, mask: Sequence[bool] | np.ndarray | None = None
    ) -> None:
        """One round: each expert's loss in [0, 1]; ``mask`` marks the experts that
        answered. In plain floats: a handful of experts, where numpy's per-call overhead
        would cost more than the arithmetic (feedback arrives at the query rate)."""
        n = self.n_experts
        values = [min(1.0, max(0.0, float(x))) for x in losses]
        present = [bool(m) for m in mask] if mask is not None else [True] * n
        seen = [v for v, p in zip(values, present, strict=True) if p]
        if not seen:
            return
        absent = sum(seen) / len(seen)
        eta = self.eta
        logw = [
            lw - eta * (v if p else absent)
            for lw, v, p in zip(self.logw, values, present, strict=True)
        ]
        if self.share > 0:
            top = max(logw)
            w = [math.exp(x - top) for x in logw]
            total = sum(w)
            keep, spread = 1.0 - self.share, self.share / n
            logw = [math.log(keep * x / total + spread) for x in w]
        self.logw = normalise(logw)
        self._weights = None

    def resize(self, keep: list[int | None]) -> None:
        self.logw = resized(self.logw, len(keep), keep)
        self._weights = None

    def to_state(self) -> dict[str, Any]:
        return {"eta": self.eta, "share": self.share, "logw": list(self.logw)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Exp4:
        algo = cls(len(d["logw"]), d["eta"], d["share"])
        algo.logw = [float(x) for x in d["logw"]]
        return algo
