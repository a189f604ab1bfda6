"""A uniform batch interface over models: scikit-learn estimators and numpy callables.

``predict_batch`` never raises for bad input or a failing model: every row gets either an
answer or the reason it has none, so one bad query cannot take a replica down."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.validation import InputSpec, validate

METHODS = ("predict_proba", "decision_function", "predict")


@dataclass
class BatchOutput:
    labels: list[str | None]
    scores: np.ndarray  # float64, rows x len(classes); rows x 1 for values
    classes: list[str]
    errors: list[str | None]


def _label(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _values(out: np.ndarray) -> np.ndarray:
    """Numeric predictions as a rows x 1 score column (zeros for non-numeric labels)."""
    if out.dtype.kind in "fiub":
        return out.astype(np.float64).reshape(-1, 1)
    return np.zeros((len(out), 1))


class ModelAdapter(ABC):
    name: str
    version: int
    input_spec: InputSpec

    @abstractmethod
    def _predict(self, X: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Labels and a rows x k score matrix for valid rows (may raise)."""

    @property
    @abstractmethod
    def classes(self) -> list[str]: ...

    def predict_batch(self, X: np.ndarray) -> BatchOutput:
        X = np.array(X, dtype=np.float64, copy=True)
        n = X.shape[0] if X.ndim >= 1 else 0
        ok, errors = validate(X, self.input_spec)
        width = max(1, len(self.classes))
        scores = np.zeros((n, width), dtype=np.float64)
        labels: list[str | None] = [None] * n
        if ok.any():
            rows = np.flatnonzero(ok)
            try:
                got_labels, got_scores = self._predict(X[rows])
                got_scores = np.asarray(got_scores, dtype=np.float64)
                if got_scores.ndim == 1:
                    got_scores = got_scores.reshape(-1, 1)
                if len(got_labels) != len(rows) or got_scores.shape[0] != len(rows):
                    raise ValueError(
                        f"model returned {len(got_labels)} answers for {len(rows)} rows"
                    )
                if got_scores.shape[1] != width:
                    scores = np.zeros((n, got_scores.shape[1]), dtype=np.float64)
                scores[rows] = got_scores
                for i, label in zip(rows, got_labels, strict=True):
                    labels[i] = label
            except Exception as exc:  # the model's failure becomes each row's answer
                why = f"model {self.name} v{self.version} failed: {type(exc).__name__}: {exc}"
                for i in rows:
                    errors[i] = why
                    labels[i] = None
        return BatchOutput(labels, scores, list(self.classes), errors)


class SklearnAdapter(ModelAdapter):
    def __init__(
        self,
        estimator: Any,
        name: str,
        version: int,
        method: str = "predict_proba",
        nan_policy: str = "reject",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if not hasattr(estimator, method):
            raise ValueError(f"{type(estimator).__name__} has no {method}()")
        self.estimator = estimator
        self.name = name
        self.version = version
        self.method = method
        self._predict_fn = getattr(estimator, method)
        self._classes = [_label(c) for c in getattr(estimator, "classes_", [])]
        dim = getattr(estimator, "n_features_in_", None)
        self.input_spec = InputSpec(
            dim=int(dim) if dim is not None else None, nan_policy=nan_policy
        )

    @property
    def classes(self) -> list[str]:
        return self._classes if self.method != "predict" else []

    def _predict(self, X: np.ndarray) -> tuple[list[str], np.ndarray]:
        out = np.asarray(self._predict_fn(X))
        if self.method == "predict":
            return [_label(v) for v in out], _values(out)
        if out.ndim == 1:  # binary decision_function: one signed margin per row
            picks = (out > 0).astype(int)
            return [self._classes[p] for p in picks], out.reshape(-1, 1)
        if out.ndim != 2 or out.shape[1] != len(self._classes):
            raise ValueError(
                f"{self.method} returned shape {out.shape}; expected (rows, "
                f"{len(self._classes)}) for {len(self._classes)} classes"
            )
        return [self._classes[p] for p in out.argmax(axis=1)], out


class CallableAdapter(ModelAdapter):
    """Any function from a rows x features batch to labels/values (1-D) or scores (2-D)."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], Any],
        name: str,
        version: int = 1,
        classes: Sequence[str] | None = None,
        input_dim: int | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.version = version
        self._classes = [str(c) for c in classes or []]
        self.input_spec = InputSpec(dim=input_dim)

    @property
    def classes(self) -> list[str]:
        return self._classes

    def _predict(self, X: np.ndarray) -> tuple[list[str], np.ndarray]:
        out = np.asarray(self.fn(X))
        if out.ndim == 2:
            if out.shape[1] != len(self._classes):
                raise ValueError(
                    f"returned {out.shape[1]} scores per row for {len(self._classes)} classes"
                )
            return [self._classes[p] for p in out.argmax(axis=1)], out
        if out.ndim != 1:
            raise ValueError(f"returned a {out.ndim}-D array; expected 1-D or 2-D")
        return [_label(v) for v in out], _values(out)
