"""Model files: skops with an explicit trusted-types list; pickle only when trusted.

Model files are loaded only from paths an operator named (DESIGN.md invariant 4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import skops.io as sio

#: type-name prefixes a skops file may ask for without the operator listing them
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")


def save_model(estimator: Any, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(estimator, path)
    return path


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
    raise ValueError(f"unknown model format {format!r}: use skops, pickle or joblib")
