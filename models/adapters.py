"""A uniform batch interface over models: scikit-learn estimators, ONNX graphs (run by
onnxruntime) and numpy callables.

``predict_batch`` never raises for bad input or a failing model: every row gets either an
answer or the reason it has none, so one bad query cannot take a replica down."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipstream.models.files import OnnxModel
from clipstream.models.validation import InputSpec, validate

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


#: ONNX input element types a batch (float64 on the wire) can be given as
ONNX_INPUTS = {"tensor(float)": np.float32, "tensor(double)": np.float64}
FLOAT32_MAX = float(np.finfo(np.float32).max)


class OnnxAdapter(ModelAdapter):
    """An ONNX graph with one float input (rows x features) and either class scores (a
    rows x classes tensor, or skl2onnx's one {class: score} map per row) with optional
    labels, or one value per row (a regressor). Classes come from the graph
    (``files.onnx_classes``); scores without named classes are labelled by column index."""

    def __init__(
        self, model: OnnxModel, name: str, version: int, nan_policy: str = "reject"
    ) -> None:
        self.session = model.session
        self.name = name
        self.version = version
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type not in ONNX_INPUTS:
            raise ValueError(
                "an ONNX model here takes one float or double tensor (rows x features); this "
                f"one takes {[(i.name, i.type, i.shape) for i in inputs]}"
            )
        self._input = inputs[0].name
        self._dtype = ONNX_INPUTS[inputs[0].type]
        shape = inputs[0].shape
        dim = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self.input_spec = InputSpec(dim=dim, nan_policy=nan_policy)
        scores = [
            o
            for o in outputs
            if o.type.startswith("seq(map(") or (o.type in ONNX_INPUTS and len(o.shape) == 2)
        ]
        labels = [o for o in outputs if o.type.startswith("tensor(") and len(o.shape) == 1]
        if not scores and not labels:
            raise ValueError(
                "an ONNX model here returns class scores (rows x classes) or one label or "
                f"value per row; this one returns {[(o.name, o.type, o.shape) for o in outputs]}"
            )
        self._scores = scores[0].name if scores else None
        self._labels = labels[0].name if labels else None
        width = scores[0].shape[1] if scores and len(scores[0].shape) == 2 else None
        classes = model.classes
        if classes is None and isinstance(width, int) and (width > 1 or self._labels):
            classes = [str(i) for i in range(width)]
        # a regressor: one value per row, no classes (like SklearnAdapter's predict)
        self._values = classes is None and (self._scores is None or width == 1)
        self._classes = [] if self._values else list(classes or [])
        self._names = [n for n in (self._scores, self._labels) if n is not None]

    @property
    def classes(self) -> list[str]:
        return self._classes

    def predict_batch(self, X: np.ndarray) -> BatchOutput:
        X = np.array(X, dtype=np.float64, copy=True)
        big = np.zeros(X.shape[0] if X.ndim else 0, dtype=bool)
        if self._dtype is np.float32 and X.ndim == 2:
            # finite in float64 but infinite once cast: the model would answer nonsense
            big = (np.isfinite(X) & (np.abs(X) > FLOAT32_MAX)).any(axis=1)
            X[big] = 0.0
        out = super().predict_batch(X)
        for i in np.flatnonzero(big):
            out.errors[i] = "input outside the model's float32 range"
            out.labels[i] = None
            out.scores[i] = 0.0
        return out

    def _predict(self, X: np.ndarray) -> tuple[list[str], np.ndarray]:
        got = dict(
            zip(
                self._names,
                self.session.run(self._names, {self._input: X.astype(self._dtype)}),
                strict=True,
            )
        )
        scores, labels = got.get(self._scores), got.get(self._labels)
        if isinstance(scores, list):  # ZipMap: one {class: score} per row, in class order
            keys = list(scores[0]) if scores else []
            if not self._classes:
                self._classes = [_label(k) for k in keys]
            scores = np.array([[row[k] for k in keys] for row in scores], dtype=np.float64)
        if self._values:
            values = np.asarray(scores if scores is not None else labels).reshape(len(X), -1)
            return [_label(v) for v in values[:, 0]], _values(values[:, 0])
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(self._classes):
            raise ValueError(
                f"returned scores of shape {scores.shape} for {len(self._classes)} classes"
            )
        if labels is None:
            return [self._classes[p] for p in scores.argmax(axis=1)], scores
        return [_label(v) for v in np.asarray(labels).reshape(-1)], scores


def adapter_for(
    model: Any, name: str, version: int, method: str = "predict_proba", nan_policy: str = "reject"
) -> ModelAdapter:
    """The adapter for a loaded model file (``files.load_model``)."""
    if isinstance(model, OnnxModel):
        return OnnxAdapter(model, name, version, nan_policy=nan_policy)
    return SklearnAdapter(model, name, version, method=method, nan_policy=nan_policy)
