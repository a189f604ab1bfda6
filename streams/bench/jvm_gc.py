"""The broker JVM's collection pauses, read from the GC log the embedded broker writes.

A pause stops the whole broker: every record on its way through waits it out, and a query
crosses the broker four times. Under the bench's ensemble load the serial collector
paused the broker 10-30 ms every two seconds, and those pauses held a third to a half of
the slowest 1% of queries (docs/benchmarks.md, "The broker's collector"), so each metered
phase says how long the broker was paused in it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: HotSpot's unified log with the ``timemillis`` decorator: a pause is logged as it ends,
#: with its length, e.g. ``[0.758s][1796538377960ms] GC(0) Pause Young (...) 128M->24M(491M)
#: 21.586ms``
PAUSE = re.compile(r"\[(\d+)ms\].*\bPause\b.*?([0-9.]+)ms\s*$")
LOG_OPTION = re.compile(r"^-Xlog:gc[^:]*:file=\"?([^\":]+)\"?")


def gc_log_of(pid: int) -> Path | None:
    """The GC log a running JVM writes (its ``-Xlog:gc:file=...`` option), if any."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in args:
        found = LOG_OPTION.match(arg.decode("utf-8", "replace"))
        if found:
            return Path(found.group(1))
    return None


def pauses(lines: list[str], since: float, until: float) -> list[tuple[float, float]]:
    """(start, seconds) of each pause that ended between two wall-clock times (seconds
    since the epoch)."""
    out = []
    for line in lines:
        found = PAUSE.search(line)
        if found is None:
            continue
        end = int(found.group(1)) / 1000
        if since <= end <= until:
            seconds = float(found.group(2)) / 1000
            out.append((end - seconds, seconds))
    return out


def read_pauses(log: Path, since: float, until: float) -> list[tuple[float, float]]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return pauses(text.splitlines(), since, until)


def pause_figures(found: list[tuple[float, float]], window_s: float) -> dict[str, Any]:
    """How often, how long in all and at most the broker was paused, and the share of the
    window it spent paused."""
    lengths = [seconds for _, seconds in found]
    return {
        "pauses": len(lengths),
        "total_ms": 1000 * sum(lengths),
        "max_ms": 1000 * max(lengths, default=0.0),
        "share": sum(lengths) / window_s if window_s > 0 else None,
    }
