"""Compiling a scikit-learn model file to ONNX at deploy, served only if it answers the same.

A skops file costs a replica ~10 ms of CPU per ensemble query on this machine where its
ONNX graph costs a tenth of that (docs/benchmarks.md): ``clipstream model deploy --compile
onnx`` converts the estimator with skl2onnx, runs both on sample rows through the same
adapters the replica uses, and deploys the graph only when the labels agree on every row
and the class scores within ``SCORE_TOLERANCE``; otherwise it says why and the original
file is deployed. ONNX graphs compute in float32, hence a tolerance and not equality: a
row whose two best classes are closer than the tolerance may fairly pick either, so such
ties are not counted as disagreements.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipstream.models.adapters import OnnxAdapter, SklearnAdapter
from clipstream.models.files import load_model, load_onnx, save_onnx

#: the largest difference in a class score (probability) between the two that still agrees
SCORE_TOLERANCE = 1e-4
#: random rows tried when the operator gives no sample of real rows
SAMPLE_ROWS = 256
#: methods whose output an ONNX graph from skl2onnx reproduces (class scores)
COMPILABLE = ("predict_proba",)


@dataclass(frozen=True)
class Compiled:
    """What a compile did: the file to deploy and its format, and why."""

    path: str
    fmt: str
    compiled: bool
    explanation: str


def sample_rows(dim: int, given: Path | None = None, seed: int = 0) -> np.ndarray:
    """Rows to compare on: the operator's (a .npy array or a CSV of numbers, rows x dim),
    else standard-normal rows (a fixed seed: the same check on every deploy)."""
    if given is None:
        return np.random.default_rng(seed).standard_normal((SAMPLE_ROWS, dim))
    rows = np.load(given) if given.suffix == ".npy" else np.loadtxt(given, delimiter=",", ndmin=2)
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"{given}: expected rows x {dim} numbers, got shape {rows.shape}")
    return rows


def compare(original: Any, graph: Any, rows: np.ndarray) -> str | None:
    """None if ``graph`` answers ``rows`` as ``original`` does (adapters' outputs), else
    what differs."""
    a, b = original.predict_batch(rows), graph.predict_batch(rows)
    if a.classes != b.classes:
        return f"classes differ: {a.classes[:5]} against {b.classes[:5]}"
    if a.scores.shape != b.scores.shape:
        return f"scores' shapes differ: {a.scores.shape} against {b.scores.shape}"
    gap = float(np.max(np.abs(a.scores - b.scores))) if a.scores.size else 0.0
    top2 = np.sort(a.scores, axis=1)[:, -2:] if a.scores.shape[1] > 1 else None
    tied = (top2[:, 1] - top2[:, 0] <= SCORE_TOLERANCE) if top2 is not None else None
    differ = [
        i
        for i, (x, y) in enumerate(zip(a.labels, b.labels, strict=True))
        if x != y and not (tied is not None and tied[i])
    ]
    if differ:
        i = differ[0]
        return (
            f"labels differ on {len(differ)} of {len(rows)} rows (row {i}: "
            f"{a.labels[i]!r} against {b.labels[i]!r})"
        )
    if gap > SCORE_TOLERANCE:
        return f"scores differ by up to {gap:.2e} (tolerance {SCORE_TOLERANCE:.0e})"
    return None


def compile_onnx(
    path: str,
    fmt: str,
    method: str,
    input_dim: int | None,
    *,
    out_dir: Path | None = None,
    sample: Path | None = None,
) -> Compiled:
    """The ONNX graph of the model at ``path`` if it answers as the model does, else the
    model itself; never raises for a model that cannot be compiled (it says why)."""

    def original(why: str) -> Compiled:
        return Compiled(path, fmt, False, f"not compiled: {why}; serving the {fmt} file")

    if fmt != "skops":
        return original(f"--compile reads skops files, this one is {fmt}")
    if method not in COMPILABLE:
        return original(f"an ONNX graph answers with class scores (predict_proba), not {method}")
    estimator = load_model(path, fmt)
    dim = input_dim or getattr(estimator, "n_features_in_", None)
    if dim is None:
        return original("the number of features is unknown: give --input-dim")
    out = Path(out_dir or tempfile.mkdtemp(prefix="clipstream-compile-"))
    target = out / f"{Path(path).stem}.onnx"
    try:
        save_onnx(estimator, target, int(dim))
        graph = OnnxAdapter(load_onnx(target), "compiled", 0)
    except Exception as exc:  # skl2onnx has no converter, or the graph will not load
        return original(f"skl2onnx could not convert {type(estimator).__name__} ({exc})")
    rows = sample_rows(int(dim), sample)
    differs = compare(SklearnAdapter(estimator, "original", 0, method=method), graph, rows)
    if differs is not None:
        return original(f"the ONNX graph does not answer as the model does: {differs}")
    return Compiled(
        str(target),
        "onnx",
        True,
        f"compiled to ONNX: answers match on {len(rows)} rows (scores within "
        f"{SCORE_TOLERANCE:.0e})",
    )
