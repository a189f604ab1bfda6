"""The broker's collection pauses as the bench reads them: from a real JVM's GC log, found
through the JVM's command line, and only those inside a phase's window."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from clipstream.streams.bench.jvm_gc import gc_log_of, pause_figures, pauses, read_pauses
from clipstream.streams.bench.meter import BROKER, PhaseMeter, Watched
from tests.conftest import wait_for

#: allocates short-lived arrays forever: a young collection every tenth of a second or so
CHURN = """
public class Churn {
    public static void main(String[] args) throws Exception {
        long kept = 0;
        while (true) { byte[] b = new byte[64 * 1024]; kept += b.length; Thread.sleep(0, 1000); }
    }
}
"""


def test_a_jvms_pauses_are_read_from_the_log_its_command_line_names(tmp_path: Path) -> None:
    source = tmp_path / "Churn.java"
    source.write_text(CHURN)
    log = tmp_path / "gc dir" / "gc.log"
    log.parent.mkdir()
    since = time.time()
    java = subprocess.Popen(
        [
            "java",
            "-Xmx64m",
            "-Xmn8m",
            "-XX:+UseSerialGC",
            f'-Xlog:gc:file="{log}":timemillis,uptime',  # as the embedded broker starts
            str(source),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: gc_log_of(java.pid), 30, "the JVM's command line") == log
        meter = PhaseMeter([Watched("broker", BROKER, java.pid)])
        before = meter.start()
        found = wait_for(
            lambda: len(got := read_pauses(log, since, time.time())) >= 3 and got,
            60,
            "three young collections",
        )
        figures = meter.stop(before, answered=1)
    finally:
        java.kill()
        java.wait()
    until = time.time()
    for start, seconds in found:
        assert since <= start + seconds <= until
        assert 0 < seconds < 5
    gc = figures["broker_gc"]
    # the phase began after the JVM did: at most the pauses seen since it began
    assert 1 <= gc["pauses"] <= len(read_pauses(log, since, until))
    assert gc["max_ms"] > 0 and 0 < gc["share"] < 1


def test_only_pauses_that_end_inside_the_window_count() -> None:
    lines = [
        "[0.003s][1000000ms] Using Parallel",
        "[1.000s][1001000ms] GC(0) Pause Young (Allocation Failure) 128M->24M(491M) 21.586ms",
        "[2.000s][1002000ms] GC(1) Pause Young (Allocation Failure) 150M->30M(491M) 4.000ms",
        "[3.000s][1003000ms] GC(2) Garbage Collection (Allocation Rate) 460M(90%)->90M(18%)",
        "[4.000s][1004000ms] GC(3) Pause Full (Ergonomics) 300M->40M(491M) 120.5ms",
    ]
    found = pauses(lines, 1001.5, 1004.0)
    assert found == [(1002.0 - 0.004, 0.004), (1004.0 - 0.1205, 0.1205)]
    figures = pause_figures(found, 2.5)
    assert figures["pauses"] == 2
    assert abs(figures["total_ms"] - 124.5) < 1e-9 and abs(figures["max_ms"] - 120.5) < 1e-9
    assert abs(figures["share"] - 0.1245 / 2.5) < 1e-9


def test_a_process_without_a_gc_log_and_a_gone_one_have_none() -> None:
    assert gc_log_of(os.getpid()) is None  # running, and no -Xlog:gc option
    java = subprocess.Popen(["java", "-version"], stderr=subprocess.DEVNULL)
    java.wait()
    assert gc_log_of(java.pid) is None
    assert read_pauses(Path("/nonexistent/gc.log"), 0, time.time()) == []
