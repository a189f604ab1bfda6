"""Models that misbehave, saved as skops files to be served by a real replica.

A replica loads them only when its operator names their types as trusted
(``clipstream replica --trusted-type tests.integration.misbehaving_models.Raising``); the
replica process must be able to import this module (run it from the repository root, or
with the root on PYTHONPATH)."""

from __future__ import annotations

import time

import numpy as np


class DigitsShaped:
    """Looks like a fitted scikit-learn classifier on digits: 64 features, 10 classes."""

    def __init__(self) -> None:
        self.classes_ = np.arange(10)
        self.n_features_in_ = 64

    def uniform(self, X: np.ndarray) -> np.ndarray:
        return np.full((len(X), 10), 0.1)


class Raising(DigitsShaped):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise RuntimeError("this model always fails")


class WrongShape(DigitsShaped):
    """Three scores per row for ten classes."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.full((len(X), 3), 1 / 3)


class WrongRows(DigitsShaped):
    """One answer more than it was asked for."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.full((len(X) + 1, 10), 0.1)


class Hanging(DigitsShaped):
    """Takes ``seconds`` per batch: far past any query's deadline."""

    def __init__(self, seconds: float = 3.0) -> None:
        super().__init__()
        self.seconds = seconds

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return self.uniform(X)


class Slow(DigitsShaped):
    """A fixed cost per batch plus a cost per row: a model that a load can outrun."""

    def __init__(self, per_batch_s: float = 0.02, per_row_s: float = 0.002) -> None:
        super().__init__()
        self.per_batch_s = per_batch_s
        self.per_row_s = per_row_s

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        time.sleep(self.per_batch_s + self.per_row_s * len(X))
        return self.uniform(X)


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
