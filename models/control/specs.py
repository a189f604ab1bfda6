"""Which model and app specs are valid. A control record is checked when it is written
(``registry.publish``) and again when it is read (``Registry.apply``): one bad record, say a
registration with ``gamma`` 2 written by an older release or by hand, must not take the
app's queries down with it, so a reader refuses it and keeps the last good spec."""

from __future__ import annotations

import math
from typing import Any

from clipstream.models.validation import NAN_POLICIES
from clipstream.selection.state import POLICIES


def refusal(record: dict[str, Any]) -> str | None:
    """Why a control record must not be applied, or None when it is valid."""
    name = record.get("name")
    if not isinstance(name, str) or not name:
        return "a control record needs a name"
    if record.get("deleted"):
        return None
    kind = record.get("kind")
    if kind == "MODEL":
        why = model_refusal(record.get("model"))
    elif kind == "APP":
        why = app_refusal(record.get("app"))
    else:
        return f"{name}: unknown kind {kind!r}"
    return f"{kind.lower()} {name}: {why}" if why else None


def app_refusal(spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return "no app spec"
    models = spec.get("models")
    if not isinstance(models, list) or not models:
        return "an app needs at least one model"
    if not all(isinstance(m, str) and m for m in models) or len(set(models)) != len(models):
        return f"models must be distinct names, got {models}"
    policy = spec.get("policy")
    if policy not in POLICIES:
        return f"policy must be one of {', '.join(POLICIES)}, got {policy!r}"
    if policy == "SINGLE" and len(models) != 1:
        return "policy SINGLE takes exactly one model; use EXP3 or EXP4 for several"
    return (
        _number(spec, "deadline_ms", low=0.0, low_open=True)
        or _number(spec, "eta", low=0.0, low_open=True)
        or _number(spec, "gamma", low=0.0, high=1.0)
        or _dimension(spec)
    )


def model_refusal(spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return "no model spec"
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        return "a model needs at least one version"
    known = [v.get("version") for v in versions if isinstance(v, dict)]
    if spec.get("version") not in known:
        return f"serving version {spec.get('version')!r} is not one of its versions {known}"
    for v in versions:
        nan_policy = v.get("nan_policy", "reject")
        if nan_policy not in NAN_POLICIES:
            return f"v{v['version']}: nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}"
        if why := _dimension(v):
            return f"v{v['version']}: {why}"
    for key in ("partitions", "batch_max"):
        value = spec.get(key, 1)
        if not isinstance(value, int) or value < 1:
            return f"{key} must be a whole number >= 1, got {value!r}"
    return _number(spec, "batch_wait_ms", low=0.0) or _number(
        spec, "latency_slo_ms", low=0.0, low_open=True
    )


def _number(
    spec: dict[str, Any],
    key: str,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
) -> str | None:
    if key not in spec:
        return None  # the schema's default applies
    value = spec[key]
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if ok:
        return None
    if math.isfinite(high):
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    return f"{key} must be a number {bounds}, got {value!r}"


def _dimension(spec: dict[str, Any]) -> str | None:
    dim = spec.get("input_dim")
    if dim is None or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
        return None
    return f"input_dim must be a whole number >= 1, got {dim!r}"
