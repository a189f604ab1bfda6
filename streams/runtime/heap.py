"""What the garbage collector walks in a long-running worker or replica.

CPython's full collection (generation 2) walks every object it tracks. Once its imports
and models are loaded (numpy, scikit-learn, onnxruntime, aiohttp, the models'
trees) a worker or replica tracks some 90,000-125,000 objects, and a full collection took
71-114 ms in a worker at 200 q/s, every 40-70 s. The thread that triggers it holds the GIL
all that time, so the serving loop or the replica stops: one pause is longer than the whole
latency objective of the queries waiting behind it. Those objects live as long as the
process, so they are taken out of the collector's reach once loaded; the structures that
grow with the load hold flat tuples, which CPython stops tracking (worker.answers, the
learner's kept observations). Measured in docs/benchmarks.md ("The collector, and the
writer's own partitions")."""

from __future__ import annotations

import gc


def freeze_loaded() -> int:
    """Exempt every object alive now from later collections (reference counting still
    frees them); returns how many objects are exempt in all."""
    # garbage now would otherwise live on, exempt, to the end of the process
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
