"""Per-model input checks that mark bad rows instead of failing the batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NAN_POLICIES = ("reject", "allow", "zero")


@dataclass(frozen=True)
class InputSpec:
    dim: int | None
    dtype: str = "float64"
    nan_policy: str = "reject"  # reject | allow | zero

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, not {self.nan_policy!r}")


def validate(X: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, list[str | None]]:
    """A mask of valid rows and, per row, why it is not (None when it is).

    With ``nan_policy="zero"`` non-finite values are replaced in place, so X must be a
    writable copy the caller owns."""
    n = X.shape[0] if X.ndim >= 1 else 0
    reasons: list[str | None] = [None] * n
    if X.ndim != 2:
        return np.zeros(n, dtype=bool), [f"expected a 2-D batch, got {X.ndim}-D"] * n
    if spec.dim is not None and X.shape[1] != spec.dim:
        why = f"expected {spec.dim} features, got {X.shape[1]}"
        return np.zeros(n, dtype=bool), [why] * n
    ok = np.ones(n, dtype=bool)
    if spec.nan_policy != "allow" and X.dtype.kind == "f":
        finite = np.isfinite(X).all(axis=1)
        if not finite.all():
            if spec.nan_policy == "zero":
                X[~np.isfinite(X)] = 0.0
            else:
                ok &= finite
                for i in np.flatnonzero(~finite):
                    reasons[i] = "input contains NaN or inf"
    return ok, reasons


def to_matrix(
    rows: Sequence[Sequence[float]], dim: int | None
) -> tuple[np.ndarray, list[str | None]]:
    """A float64 matrix from ragged rows; rows of the wrong length become zeros and get a
    reason instead of failing the whole batch."""
    n = len(rows)
    if dim is None:
        dim = len(rows[0]) if n else 0
    X = np.zeros((n, dim), dtype=np.float64)
    reasons: list[str | None] = [None] * n
    for i, row in enumerate(rows):
        if len(row) != dim:
            reasons[i] = f"expected {dim} features, got {len(row)}"
            continue
        try:
            X[i] = row
        except (TypeError, ValueError) as exc:
            reasons[i] = f"features are not numbers: {exc}"
    return X, reasons
