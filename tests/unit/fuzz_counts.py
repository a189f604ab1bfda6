"""Counts of the inputs the fuzz tests tried, printed at the end of the run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

TRIED: Counter[str] = Counter()


def tried(what: str, n: int = 1) -> None:
    TRIED[what] += n


@pytest.fixture(scope="module")
def report_inputs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Use in a fuzz module: prints how many inputs each of its tests tried."""
    before = Counter(TRIED)
    yield
    new = TRIED - before
    line = f"fuzz inputs tried in {request.module.__name__}: " + ", ".join(
        f"{k}={v}" for k, v in sorted(new.items())
    )
    line += f" (total {sum(new.values())})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():  # shown without -s too
        print("\n" + line)
