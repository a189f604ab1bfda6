"""Model files: skops with an explicit trusted-types list, ONNX graphs; pickle only when
trusted.

Model files are loaded only from artifacts an operator deployed, checked against their
digest (models/control/artifacts.py, DESIGN.md invariant 4). An ONNX file is a graph of operators,
not code: loading it runs nothing of the file's own."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as sio

FORMATS = ("skops", "onnx", "pickle", "joblib")

#: type-name prefixes a skops file may ask for without the operator listing them
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")


def save_model(estimator: Any, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(estimator, path)
    return path


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX graph ready to run, and its class labels when the graph names them."""

    session: Any  # onnxruntime.InferenceSession
    classes: list[str] | None


def save_onnx(estimator: Any, path: Path | str, n_features: int) -> Path:
    """Convert a fitted scikit-learn estimator to ONNX with skl2onnx: float32 input, and class
    scores as one rows x classes tensor (skl2onnx's default, a dict per row, costs Python
    work per row at serving time)."""
    from skl2onnx import to_onnx
    from sklearn.base import is_classifier

    options = {"zipmap": False} if is_classifier(estimator) else None
    with warnings.catch_warnings():
        # skl2onnx reads an SVC's probA_/probB_, which scikit-learn 1.9 marks deprecated:
        # the converter's business, not the user's
        warnings.filterwarnings("ignore", r"Attribute `prob[AB]_` was deprecated", FutureWarning)
        proto = to_onnx(estimator, np.zeros((1, n_features), dtype=np.float32), options=options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def onnx_classes(proto: Any) -> list[str] | None:
    """Class labels of an ONNX classifier: the metadata property ``classes`` (a JSON list, how
    an export from another framework names them), else the labels of an ``ai.onnx.ml``
    classifier node (what skl2onnx writes)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if "classes" in meta:
        return [str(c) for c in json.loads(meta["classes"])]
    for node in proto.graph.node:
        if node.domain != "ai.onnx.ml":
            continue
        for attr in node.attribute:
            if attr.name in ("classlabels_ints", "classlabels_int64s"):
                return [str(v) for v in attr.ints]
            if attr.name == "classlabels_strings":
                return [v.decode() for v in attr.strings]
    return None


def load_onnx(path: Path | str) -> OnnxModel:
    import onnx
    import onnxruntime as ort

    data = Path(path).read_bytes()
    proto = onnx.load_model_from_string(data)
    # external data names other files by path: a deployed artifact is one file, and a path
    # inside it must not make the replica read files of its host
    external = [
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ValueError(
            f"{path}: ONNX tensors kept in external files are not supported ({external[:3]}); "
            "save the model as one file"
        )
    options = ort.SessionOptions()
    # a replica is one model process among several on a host (Clipper's model container):
    # one thread each, and more replicas for more throughput, as with the scikit-learn models
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return OnnxModel(session, onnx_classes(proto))


def untrusted_types(path: Path | str, trusted: Sequence[str] = ()) -> list[str]:
    """Types the file needs that neither the allowlist nor the operator trusts."""
    allowed = set(trusted)
    return [
        t
        for t in sio.get_untrusted_types(file=Path(path))
        if t not in allowed and not t.startswith(TRUSTED_PREFIXES)
    ]


def load_model(
    path: Path | str,
    format: str = "skops",
    trusted: Sequence[str] | None = None,
    trust_pickle: bool = False,
) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if format == "skops":
        refused = untrusted_types(path, trusted or ())
        if refused:
            raise ValueError(
                f"{path} needs types that are not trusted: {refused}; pass them explicitly "
                "as trusted types if you trust this file"
            )
        needed = sio.get_untrusted_types(file=path)
        return sio.load(path, trusted=needed)
    if format in ("pickle", "joblib"):
        if not trust_pickle:
            raise PermissionError(
                f"refusing to load {path} as {format}: pickle can run arbitrary code; "
                "use skops, or pass the explicit trust flag (--trust-pickle)"
            )
        import joblib  # pickle-compatible, and what scikit-learn users save with

        return joblib.load(path)  # trust: operator passed --trust-pickle
    if format == "onnx":
        return load_onnx(path)
    raise ValueError(f"unknown model format {format!r}: use one of {', '.join(FORMATS)}")
