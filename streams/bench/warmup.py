"""The bench's unmeasured warm-up: load until the broker's JIT compiler has gone quiet.

A broker JVM that has just started compiles its hot paths for tens of seconds once load
arrives; here (two cores) its compiler threads took 0.3-0.4 of a core for about 20 s, and
a sweep point measured meanwhile paid for it (the realistic app's first point, 250 q/s:
broker 0.80 cores and p99 59 ms, against 0.52-0.56 and 34-46 ms in the three points after
it). A fixed warm-up either ended inside that or waited longer than needed, so the load
goes on in short chunks until a chunk sees the compiler threads nearly idle. A broker
that is not on this host (or not a HotSpot JVM) gets the minimum warm-up only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from clipstream.streams.bench.cpu import jit_seconds
from clipstream.streams.bench.meter import broker_pid
from clipstream.streams.wire.config import Settings

#: the JIT is done with what the load runs hot once its threads use less than this
#: (after its storm the compiler trickled at 0.02-0.07 cores; just before it, 0.1)
QUIET_CORES = 0.05
CHUNK_S = 5.0
#: a broker that keeps compiling (another tenant's load, a new code path) is measured
#: anyway after this long, and the figures say how busy its compiler still was
MAX_S = 90.0


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up took; in the bench's figures as ``broker_warm_up``."""

    seconds: float
    #: cores the broker's JIT compiler threads used in the last chunk (None: not seen)
    jit_cores: float | None

    @property
    def settled(self) -> bool:
        return self.jit_cores is not None and self.jit_cores < QUIET_CORES


def warm_up(
    run: Callable[[float], object],
    jit_seconds: Callable[[], float | None],
    min_s: float,
    *,
    max_s: float = MAX_S,
    chunk_s: float = CHUNK_S,
    clock: Callable[[], float] = time.monotonic,
) -> WarmUp:
    """``run(seconds)`` of load for at least ``min_s``, then chunk by chunk until a chunk
    finds the JIT compiler quiet or ``max_s`` have passed. ``jit_seconds``: CPU seconds the
    broker's compiler threads have used so far (None if they cannot be seen)."""
    started = clock()
    before, at = jit_seconds(), started
    run(min_s)
    while True:
        used, now = jit_seconds(), clock()
        if before is None or used is None:
            return WarmUp(now - started, None)
        cores = (used - before) / max(now - at, 1e-9)
        if cores < QUIET_CORES or now - started >= max_s:
            return WarmUp(now - started, cores)
        before, at = used, now
        run(min(chunk_s, max_s - (now - started)))


def broker_jit(settings: Settings) -> Callable[[], float | None]:
    """The CPU seconds of the broker's JIT compiler so far, read anew at each call."""
    pid = broker_pid(settings)
    return (lambda: None) if pid is None else partial(jit_seconds, pid)


def warm_up_parts(figures: dict[str, Any] | None) -> dict[str, str]:
    """The warm-up's fields of a ``bench:`` summary line."""
    if figures is None:
        return {"broker_warmup_s": "0"}
    cores = figures["jit_cores"]
    return {
        "broker_warmup_s": f"{figures['seconds']:.0f}",
        "broker_jit_cores_after": "na" if cores is None else f"{cores:.3f}",
    }
