"""Bounds that more than one component enforces, defined once so they cannot drift apart.

The worker rejects a query outside a bound with an error prediction; the REST gateway
answers 400 and the SDK's ``Client`` raises ``ValueError`` before anything is produced.
docs/openapi.yaml states the same numbers (tests/unit/test_openapi.py checks it)."""

from __future__ import annotations

#: A query may not ask for a longer deadline than this: the worker holds its pending state
#: (and a REST request its connection) that long.
MAX_DEADLINE_MS = 600_000


def deadline_problem(deadline_ms: object) -> str | None:
    """Why ``deadline_ms`` is not an acceptable per-query deadline, or None (None itself is
    fine: the app's deadline applies)."""
    if deadline_ms is None:
        return None
    if not isinstance(deadline_ms, int) or isinstance(deadline_ms, bool):
        return f"deadline_ms must be an integer number of milliseconds, got {deadline_ms!r}"
    if not 0 < deadline_ms <= MAX_DEADLINE_MS:
        return f"deadline_ms must be in (0, {MAX_DEADLINE_MS}], got {deadline_ms}"
    return None
