from __future__ import annotations

import pytest

from models.batching import AIMDController, Batcher, BatchWindow, should_flush


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


def test_should_flush_on_size_or_window() -> None:
    w = BatchWindow(max_wait_us=2_000)
    assert not should_flush(0, 8, 10_000, w)
    assert should_flush(8, 8, 0, w)
    assert not should_flush(3, 8, 1_999, w)
    assert should_flush(3, 8, 2_000, w)


def test_batcher_hands_out_full_batches_then_waits_for_the_window() -> None:
    b: Batcher[int] = Batcher(AIMDController(slo_us=1e9, initial=4), BatchWindow(1_000))
    for i in range(10):
        b.add(i, now_us=100 + i)
    assert b.due(200) == [0, 1, 2, 3]
    assert b.due(200) == [4, 5, 6, 7]
    assert b.due(200) is None  # 2 left, window not over
    assert b.next_due_us == pytest.approx(1_100)
    assert b.due(1_100) == [8, 9]
    assert b.pending == 0 and b.next_due_us is None
