"""The wire's clock: microseconds since the epoch, the unit of every ``*_at_us`` field."""

from __future__ import annotations

import time


def now_us() -> int:
    return time.time_ns() // 1000
