"""CPU time of the processes a bench phase involves, read from Linux's ``/proc``.

A process's CPU is ``utime + stime`` from ``/proc/<pid>/stat``; with ``tree=True`` its
living descendants are added, and so are the ``cutime + cstime`` its members hold for
children they already reaped, so a child that exits during a phase is still counted.
The broker the bench talks to may not be its own child (the tests start one, or
``KAFKA_BOOTSTRAP_SERVERS`` names one on this host): it is found by its listening port.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

PROC = Path("/proc")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` (``pid`` may be ``"<pid>/task/<tid>"``)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:  # gone, or not ours to read
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return text[text.rindex(")") + 2 :].split()


def children_of() -> dict[int, list[int]]:
    """Every process's children (one pass over /proc: reuse it for several trees)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children[int(fields[1])].append(int(entry.name))
    return children


def cpu_seconds(
    pid: int, *, tree: bool = True, children: dict[int, list[int]] | None = None
) -> float | None:
    """CPU seconds ``pid`` has used (with ``tree``, its descendants' too); None if gone.
    ``children``: a map from ``children_of()`` taken a moment ago."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # fields from the state on: utime, stime, cutime, cstime are the 12th-15th
    if not tree:
        return (int(fields[11]) + int(fields[12])) * _TICK_S
    if children is None:
        children = children_of()
    ticks, todo = 0, [pid]
    while todo:
        member = todo.pop()
        f = fields if member == pid else _stat_fields(member)
        if f is None:
            continue
        ticks += sum(int(v) for v in f[11:15])
        todo.extend(children.get(member, ()))
    return ticks * _TICK_S


#: what HotSpot names its JIT compiler threads ("C2 CompilerThread0", cut by Linux to 15
#: characters)
JIT_THREADS = ("C1 CompilerThre", "C2 CompilerThre")


def jit_seconds(pid: int) -> float | None:
    """CPU seconds a JVM's JIT compiler threads have used; None if the process is gone or
    has no such threads (not a HotSpot JVM)."""
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return None
    ticks, found = 0, False
    for task in tasks:
        try:
            if not (task / "comm").read_text().startswith(JIT_THREADS):
                continue
        except OSError:  # the thread ended meanwhile
            continue
        fields = _stat_fields(f"{pid}/task/{task.name}")
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
            found = True
    return ticks * _TICK_S if found else None


def pid_listening_on(port: int) -> int | None:
    """The process with a TCP socket listening on ``port`` on this host, if it is visible."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local address is hex ip:port; state 0A is LISTEN
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:  # gone, or another user's
            continue
    return None
