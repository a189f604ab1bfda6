"""Control records are checked when written and when read (issue 14): a registration with a
bad ``gamma`` or ``eta`` used to be applied as it was, and every query of the app then
failed while building its selection state. Now a reader refuses it, with the reason, and
keeps the last good spec; a writer refuses it before touching Kafka."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from clipstream.models.control.registry import Registry, RegistryError, register_app
from clipstream.selection import SelectionState
from clipstream.streams.wire.config import Settings


def app_record(**changes: Any) -> dict[str, Any]:
    spec = {
        "models": ["logreg", "forest"],
        "policy": "EXP3",
        "deadline_ms": 100.0,
        "default_label": "0",
        "personalised": False,
        "input_dim": 64,
        "eta": 0.1,
        "gamma": 0.05,
        "cache": True,
    }
    spec.update(changes)
    return {"kind": "APP", "name": "digits", "model": None, "app": spec, "deleted": False}


def model_record(**changes: Any) -> dict[str, Any]:
    spec = {
        "version": 1,
        "versions": [
            {
                "version": 1,
                "path": "/models/logreg.skops",
                "format": "skops",
                "method": "predict_proba",
                "nan_policy": "reject",
                "input_dim": 64,
                "deployed_at_us": 0,
            }
        ],
        "partitions": 4,
        "batch_max": 256,
        "batch_wait_ms": 2.0,
        "latency_slo_ms": 20.0,
    }
    spec.update(changes)
    return {"kind": "MODEL", "name": "logreg", "model": spec, "app": None, "deleted": False}


BAD_APPS = [
    ({"gamma": 2.0}, "gamma"),
    ({"gamma": -0.1}, "gamma"),
    ({"gamma": math.nan}, "gamma"),
    ({"eta": 0.0}, "eta"),
    ({"eta": -1.0}, "eta"),
    ({"eta": math.inf}, "eta"),
    ({"deadline_ms": 0.0}, "deadline_ms"),
    ({"models": []}, "at least one model"),
    ({"models": ["a", "a"]}, "distinct"),
    ({"policy": "SINGLE"}, "SINGLE takes exactly one model"),
    ({"policy": "GREEDY"}, "policy"),
    ({"input_dim": 0}, "input_dim"),
]


@pytest.mark.parametrize(("change", "named"), BAD_APPS, ids=[str(c) for c, _ in BAD_APPS])
def test_a_bad_registration_is_refused_and_the_last_good_spec_stays(
    change: dict[str, Any], named: str
) -> None:
    registry = Registry()
    assert registry.apply(app_record()) is None
    good = dict(registry.app("digits") or {})

    reason = registry.apply(app_record(**change))

    assert reason is not None and named in reason and reason.startswith("app digits:")
    assert registry.app("digits") == good
    SelectionState.for_app(good).choose(np.random.default_rng(0))  # the kept spec serves


BAD_MODELS = [
    ({"version": 2}, "serving version 2"),
    ({"versions": []}, "at least one version"),
    ({"batch_max": 0}, "batch_max"),
    ({"partitions": 0}, "partitions"),
    ({"batch_wait_ms": -1.0}, "batch_wait_ms"),
    ({"latency_slo_ms": 0.0}, "latency_slo_ms"),
]


@pytest.mark.parametrize(("change", "named"), BAD_MODELS, ids=[str(c) for c, _ in BAD_MODELS])
def test_a_bad_model_record_is_refused_and_the_last_good_version_stays(
    change: dict[str, Any], named: str
) -> None:
    registry = Registry()
    assert registry.apply(model_record()) is None

    reason = registry.apply(model_record(**change))

    assert reason is not None and named in reason and reason.startswith("model logreg:")
    assert registry.version_spec("logreg") is not None
    assert registry.model("logreg")["version"] == 1  # type: ignore[index]


def test_good_records_and_deletions_apply() -> None:
    registry = Registry()
    assert registry.apply(model_record()) is None
    assert registry.apply(app_record(policy="EXP4", gamma=0.0, eta=2.5)) is None
    assert registry.app("digits")["policy"] == "EXP4"  # type: ignore[index]
    assert registry.apply({**app_record(gamma=7.0), "deleted": True}) is None
    assert registry.app("digits") is None


def test_register_app_refuses_a_bad_spec_before_reading_the_registry() -> None:
    # nothing listens there: reaching Kafka would fail differently, and slowly
    settings = Settings(bootstrap="127.0.0.1:1")
    with pytest.raises(RegistryError, match=r"gamma must be a number in \[0, 1\], got 2.0"):
        register_app(settings, "digits", ["logreg"], policy="EXP3", gamma=2.0)
    with pytest.raises(RegistryError, match="eta must be a number > 0"):
        register_app(settings, "digits", ["logreg"], eta=-0.5)
