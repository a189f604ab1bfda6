"""The bench's cost accounting without a broker: CPU from /proc, a phase's figures per
process and per worker, the refined sweep's choice of rates, the feedback arithmetic."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from clipstream.streams.bench.compare import Plan, next_rate
from clipstream.streams.bench.cpu import cpu_seconds, pid_listening_on
from clipstream.streams.bench.ensemble import phase_row
from clipstream.streams.bench.meter import BROKER, LOADGEN, SYSTEM, Snapshot, Watched, phase_figures
from tests.conftest import wait_for

BURN = "import time\nwhile time.process_time() < 0.3: pass\ntime.sleep(60)"


def test_a_process_tree_counts_its_children_cpu() -> None:
    child = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        # /proc counts in clock ticks, a little under the child's own clock
        burned = wait_for(
            lambda: (cpu := cpu_seconds(child.pid, tree=False) or 0) >= 0.25 and cpu,
            30,
            "the child to burn its CPU",
        )
        alone = cpu_seconds(os.getpid(), tree=False)
        tree = cpu_seconds(os.getpid(), tree=True)
        assert alone is not None and tree is not None
        assert tree - alone >= burned  # the sleeping child's CPU, on top of this process's
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_has_no_cpu_figure() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu_seconds(child.pid) is None


def test_the_listener_of_a_port_is_found() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert pid_listening_on(port) == os.getpid()
    assert pid_listening_on(port) is None


def snapshot(at: float, cpu: dict, queries: dict | None = None, applied: int = 0) -> Snapshot:
    samples = {
        name: {
            ("clipstream_queries_total", (("app", "a"),)): float(q),
            ("clipstream_feedback_total", (("app", "a"), ("result", "applied"))): float(applied),
        }
        for name, q in (queries or {}).items()
    }
    return Snapshot(at, cpu, samples)


WATCHED = [
    Watched("worker-0", SYSTEM, 1, metrics_url="http://w0"),
    Watched("worker-1", SYSTEM, 2, metrics_url="http://w1"),
    Watched("replica", SYSTEM, 3),
    Watched("broker", BROKER, 4),
    Watched("loadgen", LOADGEN, 5, tree=False),
]


def test_phase_figures_per_process_per_role_and_per_worker() -> None:
    before = snapshot(
        0.0,
        {"worker-0": 1.0, "worker-1": 2.0, "replica": 0.5, "broker": 10.0, "loadgen": 3.0},
        {"worker-0": 100, "worker-1": 0},
    )
    after = snapshot(
        2.0,
        {"worker-0": 1.3, "worker-1": 2.1, "replica": 0.6, "broker": 10.4, "loadgen": 3.2},
        {"worker-0": 400, "worker-1": 100},
        applied=50,
    )
    f = phase_figures(WATCHED, before, after, answered=400, feedback_sent=100)
    assert f["processes"]["worker-0"]["cpu_us_per_query"] == pytest.approx(750)
    assert f["processes"]["broker"]["cores"] == pytest.approx(0.2)
    assert f["cpu_us_per_query"][SYSTEM] == pytest.approx((0.3 + 0.1 + 0.1) * 1e6 / 400)
    assert f["cpu_us_per_query"][BROKER] == pytest.approx(1000)
    assert f["cpu_us_per_query"][LOADGEN] == pytest.approx(500)
    workers = f["workers"]
    assert [w["queries"] for w in workers.values()] == [300, 100]
    assert sum(w["share"] for w in workers.values()) == pytest.approx(1.0)
    assert workers["worker-1"]["cpu_us_per_own_query"] == pytest.approx(1000)
    # 100 sent, each worker applied 50: none lost
    assert f["feedback"]["applied"] == 100
    assert f["feedback"]["lost"] == 0
    assert f["feedback"]["applied_per_s"] == pytest.approx(50)


def test_a_process_gone_mid_phase_gets_no_figure() -> None:
    before = snapshot(0.0, {"replica": 1.0, "broker": 1.0})
    after = snapshot(1.0, {"replica": None, "broker": 1.5})
    f = phase_figures(WATCHED[2:4], before, after, answered=10, feedback_sent=0)
    assert "replica" not in f["processes"]
    assert f["cpu_us_per_query"][SYSTEM] == 0.0
    assert "workers" not in f


def knee_search(plan: Plan, knee: float) -> tuple[list[float], float | None, float | None]:
    """The rates the sweep would offer to a system that holds up to ``knee`` q/s."""
    tried: list[float] = []
    held = failed = None
    while (rate := next_rate(held, failed, plan)) is not None:
        tried.append(rate)
        if rate <= knee:
            held = rate
        else:
            failed = rate
    return tried, held, failed


@pytest.mark.parametrize("knee", [1000.0, 260.0, 90.0, 16.0])
def test_the_sweep_brackets_the_knee_within_the_precision(knee: float) -> None:
    plan = Plan(sweep_start=250.0, sweep_factor=1.6, sweep_min=10.0, sweep_precision=0.25)
    tried, held, failed = knee_search(plan, knee)
    assert held is not None and failed is not None
    assert held <= knee < failed
    assert failed <= held * 1.25
    assert len(tried) == len(set(tried))  # no rate measured twice
    assert len(tried) <= 12


def test_the_sweep_stops_at_its_lowest_rate_when_nothing_holds() -> None:
    plan = Plan(sweep_start=250.0, sweep_factor=1.6, sweep_min=10.0)
    tried, held, failed = knee_search(plan, 1.0)
    assert held is None
    assert failed == min(tried) and min(tried) >= 10.0 and min(tried) / 1.6 < 10.0


def test_a_feedback_phase_is_costed_per_query_for_workers_and_replicas_apart() -> None:
    cost = {
        "answered": 2000,
        "processes": {
            "worker-0": {"cpu_s": 2.5, "role": SYSTEM},
            "replica-m": {"cpu_s": 3.0, "role": SYSTEM},
            "broker": {"cpu_s": 9.0, "role": BROKER},  # shared: neither
        },
        "workers": {"worker-0": {}},
        "feedback": {"applied": 1000},
    }
    row = phase_row(cost, True)
    assert row["workers_cpu_us_per_query"] == pytest.approx(1250)
    assert row["replicas_cpu_us_per_query"] == pytest.approx(1500)
    assert row["feedback_per_query"] == 0.5
    idle = phase_row({"answered": 0, "processes": {}}, False)
    assert idle["workers_cpu_us_per_query"] is None and idle["feedback_per_query"] == 0.0
