"""What a treatment (feedback) costs, from phases run with and without it, side by side.

A phase's CPU per query on this shared 2-core machine swings 5-10 % from one 30 s phase to
the next (other tenants, which process the scheduler ran where): as much as feedback
adds. Two things take that out:

- the phases alternate in ABBA order (``order``), so a drift during the run is paid by
  both sides alike;
- each phase's CPU per query of a process that does the same work with and without the
  treatment (the model replicas: the same batches either way) measures how fast the
  machine was in that phase, and the estimate is adjusted for it: an ordinary least
  squares fit of ``y = a + effect * dose + slope * reference``. Measured here, this took
  the residual of the workers' CPU per query from 31-165 us to 6-28 (docs/benchmarks.md).

The fit reports its standard error, so a figure comes with what it can resolve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def order(pairs: int) -> list[bool]:
    """Which phases get the treatment: A B B A, then B A A B, ... (``pairs`` A/B pairs)."""
    out: list[bool] = []
    for i in range(pairs):
        out += [False, True] if i % 4 in (0, 3) else [True, False]
    return out


@dataclass(frozen=True)
class Phase:
    #: a B phase (given the treatment)
    treated: bool
    #: treatment units per query in this phase (feedback records applied per query; an A
    #: phase may apply a few records left over from before it)
    dose: float
    #: the measured processes' CPU per query, us
    y: float
    #: the reference processes' CPU per query, us (the same work in every phase)
    reference: float


@dataclass(frozen=True)
class Estimate:
    #: us of the measured processes' CPU per unit of treatment, adjusted for the reference
    effect: float
    #: its standard error (None: too few phases to tell)
    se: float | None
    #: without the adjustment: mean of B less mean of A, per unit
    raw: float
    raw_se: float | None
    #: us of measured CPU per us of reference CPU
    slope: float

    def describe(self) -> str:
        def pm(se: float | None) -> str:
            return f" ± {se:.0f}" if se is not None else ""

        return (
            f"{self.effect:.0f}{pm(self.se)} us (adjusted for the machine's speed; "
            f"unadjusted {self.raw:.0f}{pm(self.raw_se)})"
        )


def estimate(phases: Sequence[Phase]) -> Estimate | None:
    """The treatment's cost per unit; None without a phase on each side, or when the B
    phases applied no more of it than the A phases (nothing to divide by)."""
    treated = [p for p in phases if p.treated]
    control = [p for p in phases if not p.treated]
    if not treated or not control:
        return None
    dose = float(np.mean([p.dose for p in treated])) - float(np.mean([p.dose for p in control]))
    if dose <= 0:
        return None
    raw, raw_se = _difference(treated, control, dose)
    y = np.array([p.y for p in phases])
    x = np.column_stack(
        [np.ones(len(phases)), [p.dose for p in phases], [p.reference for p in phases]]
    )
    if len(phases) <= 3 or np.ptp(x[:, 2]) == 0:
        return Estimate(raw, raw_se, raw, raw_se, 0.0)
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ beta
    dof = len(phases) - 3
    variance = float(residual @ residual) / dof
    covariance = variance * np.linalg.pinv(x.T @ x)
    se = math.sqrt(max(0.0, float(covariance[1, 1])))
    return Estimate(float(beta[1]), se, raw, raw_se, float(beta[2]))


def _difference(
    treated: list[Phase], control: list[Phase], dose: float
) -> tuple[float, float | None]:
    a, b = [p.y for p in control], [p.y for p in treated]
    diff = (float(np.mean(b)) - float(np.mean(a))) / dose
    if len(a) < 2 or len(b) < 2:
        return diff, None
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)) / dose
    return diff, se
