from __future__ import annotations

import pytest

from clipstream.streams.worker.batching import AIMDController, BatchPolicy, BatchQueue


def run(controller: AIMDController, latency, rounds: int = 400) -> list[int]:
    sizes = []
    for _ in range(rounds):
        size = controller.max_batch  # the batcher always fills the batch (heavy load)
        controller.observe(size, latency(size))
        sizes.append(controller.max_batch)
    return sizes


def test_aimd_settles_near_the_size_that_meets_the_slo() -> None:
    # latency = 1 ms + 50 us per row: the SLO of 10 ms is met up to 180 rows
    c = AIMDController(slo_us=10_000, initial=8, max_size=1024, additive=4, backoff=0.9)
    sizes = run(c, lambda n: 1_000 + 50 * n)
    tail = sizes[-100:]
    assert min(tail) >= 150 and max(tail) <= 184
    assert all(1_000 + 50 * s <= 10_000 * 1.03 for s in tail[::2])


def test_aimd_backs_off_after_a_spike_and_respects_bounds() -> None:
    c = AIMDController(slo_us=10_000, initial=100, min_size=2, max_size=120, backoff=0.5)
    c.observe(2, 1_000)  # the model's fixed cost: 1 ms
    assert c.observe(100, 50_000) == 50  # a miss caused by batching halves the limit
    for _ in range(100):
        c.observe(c.max_batch, 1_000)
    assert c.max_batch == 120  # never above max
    seen = [c.observe(c.max_batch, 80_000) for _ in range(40)]
    assert min(seen) == 2  # shrinks to min and never below


def test_aimd_keeps_growing_when_even_one_row_misses_the_slo() -> None:
    # a slow model: 40 ms per call whatever the batch; shrinking would only cost throughput
    c = AIMDController(slo_us=20_000, initial=1, max_size=64)
    c.observe(1, 40_000)
    sizes = run(c, lambda n: 40_000 + 10 * n, rounds=30)
    assert sizes[-1] == 64


def test_policy_sends_to_an_idle_model_at_once_and_batches_for_a_busy_one() -> None:
    policy = BatchPolicy(AIMDController(slo_us=1e9, initial=8), max_wait_us=2_000)
    assert policy.take(0, 10_000, idle=True) == 0
    assert policy.take(3, 0, idle=True) == 3  # idle: no reason to wait
    assert policy.take(3, 1_999, idle=False) == 0  # busy: wait for the window...
    assert policy.take(3, 2_000, idle=False) == 3  # ...until it is over
    assert policy.take(20, 0, idle=False) == 8  # or a full batch, at most the AIMD limit
    assert policy.due_us(100) == 2_100


def test_an_idle_model_whose_rows_come_densely_waits_for_a_second_row() -> None:
    policy = BatchPolicy(AIMDController(slo_us=1e9, initial=8), 2_000, idle_wait_us=8_000)
    assert policy.take(1, 0, idle=True, gap_us=None) == 1  # no gap known: at once
    assert policy.take(1, 0, idle=True, gap_us=12_000) == 1  # rows sparser than the wait
    assert policy.take(1, 1_000, idle=True, gap_us=5_000) == 0  # dense: wait for another
    assert policy.take(2, 1_000, idle=True, gap_us=5_000) == 2  # ...which came
    assert policy.take(1, 8_000, idle=True, gap_us=5_000) == 1  # or the wait ran out
    assert policy.due_us(100, idle=True) == 8_100 and policy.due_us(100) == 2_100
    # without an idle wait (the policy's default) an idle model never waits
    assert BatchPolicy(AIMDController(slo_us=1e9), 2_000).take(1, 0, True, gap_us=10.0) == 1


def test_queue_follows_the_gap_between_its_rows() -> None:
    q: BatchQueue[str] = BatchQueue()
    q.add("a", now_us=0)
    assert q.gap_us is None
    q.add("b", now_us=5_000)
    assert q.gap_us == 5_000
    q.take(2)  # an empty queue keeps what it learnt of the rate
    q.add("c", now_us=15_000)
    assert q.gap_us == pytest.approx(0.8 * 5_000 + 0.2 * 10_000)
    assert q.first() == "c"


def test_queue_hands_out_oldest_rows_and_keeps_the_oldest_arrival() -> None:
    q: BatchQueue[int] = BatchQueue()
    for i in range(10):
        q.add(i, now_us=100 + i)
    assert q.take(4) == [0, 1, 2, 3]
    assert q.oldest_us == 100  # rows left behind waited at least this long
    assert q.retain(lambda i: i % 2 == 0) == 3
    assert q.take(10) == [4, 6, 8]
    assert len(q) == 0 and q.oldest_us is None


def test_a_redeployed_models_batch_settings_take_effect_at_once() -> None:
    from clipstream.streams.wire.sensors import Sensor
    from clipstream.streams.worker.dispatch import Dispatcher

    dispatcher = Dispatcher(producer=None, sensor=Sensor())
    spec = {"latency_slo_ms": 20.0, "batch_max": 64, "batch_wait_ms": 2.0}
    dispatcher.enqueue("m", 1, spec, "q1", 0)
    first = dispatcher.policies["m"]
    dispatcher.enqueue("m", 1, spec, "q2", 1)
    assert dispatcher.policies["m"] is first  # unchanged settings: the same AIMD state
    dispatcher.enqueue("m", 2, {**spec, "batch_max": 8, "batch_wait_ms": 0.5}, "q3", 2)
    assert dispatcher.policies["m"] is not first
    assert dispatcher.policies["m"].controller.max_size == 8
