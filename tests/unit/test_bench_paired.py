"""The bench's side-by-side cost estimate: ABBA order, and the adjustment for how fast the
machine was in each phase, on phases whose true cost is known."""

from __future__ import annotations

import numpy as np
import pytest

from clipstream.streams.bench.paired import Phase, estimate, order


def test_phases_alternate_so_a_drift_falls_on_both_sides_alike() -> None:
    assert order(2) == [False, True, True, False]
    phases = order(4)
    assert phases == [False, True, True, False, True, False, False, True]
    treated = [i for i, t in enumerate(phases) if t]
    control = [i for i, t in enumerate(phases) if not t]
    assert sum(treated) == sum(control)  # a linear drift cancels


def synthetic(effect: float, seed: int, pairs: int = 4) -> list[Phase]:
    """Worker and replica CPU both scale with the machine's speed in a phase (+-8 %), the
    workers pay ``effect`` per feedback record in B, and each has 1 % noise of its own."""
    rng = np.random.default_rng(seed)
    out = []
    for treated in order(pairs):
        speed = 1 + rng.normal(0, 0.08)
        dose = 0.98 if treated else 0.0
        y = speed * (1200 + effect * dose) * (1 + rng.normal(0, 0.01))
        reference = speed * 1500 * (1 + rng.normal(0, 0.01))
        out.append(Phase(treated, dose, y, reference))
    return out


def test_the_adjusted_estimate_finds_the_cost_the_raw_difference_cannot_resolve() -> None:
    hits, adjusted_se, raw_se, slopes = 0, [], [], []
    for seed in range(40):
        got = estimate(synthetic(100.0, seed))
        assert got is not None and got.se is not None and got.raw_se is not None
        hits += abs(got.effect - 100.0) <= 2.5 * got.se
        adjusted_se.append(got.se)
        raw_se.append(got.raw_se)
        slopes.append(got.slope)
    assert hits >= 36  # the stated uncertainty covers the truth
    assert np.median(adjusted_se) * 3 < np.median(raw_se)
    # ~1,250 us of the workers' per 1,500 of the replicas'
    assert np.median(slopes) == pytest.approx(1250 / 1500, abs=0.05)


def test_without_a_phase_on_each_side_there_is_no_estimate() -> None:
    assert estimate([Phase(False, 0.0, 1200, 1500), Phase(False, 0.0, 1210, 1500)]) is None
    # B phases whose feedback was never applied: no cost per record to speak of
    assert estimate([Phase(False, 0.0, 1200, 1500), Phase(True, 0.0, 1210, 1500)]) is None
    one_pair = estimate([Phase(False, 0.0, 1200, 1500), Phase(True, 1.0, 1300, 1500)])
    assert one_pair is not None and one_pair.effect == pytest.approx(100.0)
    assert one_pair.se is None  # one pair cannot say how far to trust it


def test_records_left_over_in_a_queries_only_phase_are_charged_as_what_they_are() -> None:
    # the first A phase applied 2 % of a record per query left over from before it
    phases = [
        Phase(False, 0.02, 1200 + 100 * 0.02, 1500),
        Phase(True, 1.0, 1300, 1500),
        Phase(True, 1.0, 1300 * 1.05, 1500 * 1.05),
        Phase(False, 0.0, 1200 * 1.05, 1500 * 1.05),
    ]
    got = estimate(phases)
    assert got is not None
    assert got.effect == pytest.approx(100.0, rel=0.05)
    # two B phases against two A phases, per record more of B than of A
    assert got.raw == pytest.approx((1300 * 2.05 - 1200 * 2.05 - 2) / 2 / 0.99)
