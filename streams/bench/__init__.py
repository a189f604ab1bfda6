"""``clipstream bench``: clipstream side by side with the floor, the naive loop and a peer.

Modules: ``loadgen`` (the open-loop client every system is driven by), ``systems`` (how
each system is started and spoken to), ``floor`` and ``naive`` (the two baselines, run as
processes), ``peer`` (MLServer in its own virtualenv), ``compare`` (light load, burst
capacity and the sweep per system), ``report`` (JSON, table, summary line), ``plot``,
and ``suites`` (the batching-gain and selection suites).
"""

from __future__ import annotations

from clipstream.streams.bench.run import run_bench

__all__ = ["run_bench"]
