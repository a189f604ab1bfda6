"""What the garbage collector walks in a long-running worker or replica.

CPython's full collection (generation 2) walks every object it tracks. Once its imports
and models are loaded (numpy, scikit-learn, onnxruntime, faust, aiohttp, the models'
trees) a worker or replica tracks some 90,000-125,000 objects, and a full collection of
them takes 35-75 ms of CPU (measured: docs/benchmarks.md, "Garbage collection"). The
thread that triggers it holds the GIL all that time, so the serving loop or the replica
stops: one pause is longer than the whole latency objective of the queries waiting behind
it, and at a few hundred queries a second a full collection came every 40-70 s. Those
objects live as long as the process, so they are taken out of the collector's reach once
loaded; what is allocated while serving is collected as before."""

from __future__ import annotations

import gc


def freeze_loaded() -> int:
    """Exempt every object alive now from later collections (reference counting still
    frees them); returns how many objects are exempt in all."""
    # garbage now would otherwise live on, exempt, to the end of the process
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
