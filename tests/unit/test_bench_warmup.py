"""The bench's warm-up: load goes on until the broker's JIT compiler is quiet, read from a
real JVM's compiler threads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from clipstream.streams.bench.cpu import jit_seconds
from clipstream.streams.bench.warmup import QUIET_CORES, warm_up, warm_up_parts
from tests.conftest import wait_for


class FakeBroker:
    """A clock and a JIT whose compiler uses ``storm`` cores during the given seconds."""

    def __init__(self, busy: list[tuple[float, float]], storm: float = 0.4) -> None:
        self.now = 0.0
        self.busy = busy
        self.storm = storm
        self.jit = 0.0
        self.runs: list[float] = []

    def run(self, seconds: float) -> None:
        self.runs.append(seconds)
        step = 0.5
        for _ in range(round(seconds / step)):
            busy = any(a <= self.now < b for a, b in self.busy)
            self.jit += step * (self.storm if busy else QUIET_CORES / 4)
            self.now += step

    def clock(self) -> float:
        return self.now


def test_the_warm_up_outlasts_a_compile_storm_that_starts_after_its_minimum() -> None:
    broker = FakeBroker(busy=[(6.0, 24.0)])
    done = warm_up(broker.run, lambda: broker.jit, 8.0, clock=broker.clock, chunk_s=5.0)
    assert done.settled
    # not before the storm ended, and the first quiet chunk after it ends the warm-up
    assert 24.0 < done.seconds <= 24.0 + 2 * 5.0
    assert broker.runs[0] == 8.0


def test_a_quiet_broker_is_warmed_for_the_minimum_only() -> None:
    broker = FakeBroker(busy=[])
    done = warm_up(broker.run, lambda: broker.jit, 8.0, clock=broker.clock)
    assert done.settled and done.seconds == 8.0 and broker.runs == [8.0]


def test_a_broker_that_keeps_compiling_is_measured_after_the_cap() -> None:
    broker = FakeBroker(busy=[(0.0, 1e9)])
    done = warm_up(broker.run, lambda: broker.jit, 8.0, clock=broker.clock, max_s=30.0)
    assert not done.settled and done.seconds == 30.0
    assert warm_up_parts(done.__dict__)["broker_jit_cores_after"] == "0.400"


def test_a_broker_out_of_sight_gets_the_minimum() -> None:
    broker = FakeBroker(busy=[(0.0, 1e9)])
    done = warm_up(broker.run, lambda: None, 8.0, clock=broker.clock)
    assert done.jit_cores is None and not done.settled and broker.runs == [8.0]
    assert warm_up_parts(done.__dict__)["broker_jit_cores_after"] == "na"


SPIN = """
public class Spin {
    public static void main(String[] args) throws Exception {
        long x = 0;
        for (long i = 0; ; i++) { x += i % 7; if (i % 100000000 == 0) System.out.println(x); }
    }
}
"""


def test_the_jit_of_a_real_jvm_is_seen_and_a_python_process_has_none(tmp_path: Path) -> None:
    source = tmp_path / "Spin.java"
    source.write_text(SPIN)
    java = subprocess.Popen(
        ["java", "-XX:+UseSerialGC", str(source)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # the source launcher compiles the file with javac in the JVM: its JIT gets busy
        wait_for(lambda: (jit_seconds(java.pid) or 0.0) > 0.0, 60, "the JVM's JIT to use CPU")
    finally:
        java.kill()
        java.wait()
    assert jit_seconds(java.pid) is None  # gone
    assert jit_seconds(os.getpid()) is None  # no compiler threads


def test_no_warm_up_says_so() -> None:
    assert warm_up_parts(None) == {"broker_warmup_s": "0"}
