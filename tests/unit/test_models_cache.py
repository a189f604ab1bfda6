from __future__ import annotations

import numpy as np

from clipstream.streams.worker.cache import PredictionCache


def test_lru_evicts_least_recently_used_and_counts() -> None:
    c = PredictionCache(capacity=2)
    a, b, d = (c.key("m", 1, np.array([float(i)])) for i in range(3))
    c.put(a, "A")
    c.put(b, "B")
    assert c.get(a) == "A"  # a is now the most recent
    c.put(d, "D")
    assert c.get(b) is None and c.get(a) == "A" and c.get(d) == "D"
    assert (c.hits, c.misses, len(c)) == (3, 1, 2)


def test_key_depends_on_model_version_and_input() -> None:
    x = np.arange(64, dtype=float)
    k = PredictionCache.key("m", 1, x)
    assert k == PredictionCache.key("m", 1, x.copy())
    assert k == PredictionCache.key("m", 1, x.astype("<f8").tobytes())
    assert k != PredictionCache.key("m", 2, x)
    assert k != PredictionCache.key("n", 1, x)
    y = x.copy()
    y[5] += 1e-9
    assert k != PredictionCache.key("m", 1, y)
