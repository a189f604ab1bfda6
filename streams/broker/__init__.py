"""The embedded dev broker: a real Apache Kafka (KRaft, one combined broker+controller node)
on 127.0.0.1, run from jars that ``mvn`` resolves from Maven Central and caches.

Used by the tests, the demo and the bench; ``KAFKA_BOOTSTRAP_SERVERS`` points everything at
an existing cluster instead. The parts live apart: ``jars`` (Maven resolution and its
cache), ``process`` (the JVM of an ``EmbeddedBroker``: config, start, readiness, stop) and
``detached`` (the state file of a broker ``clipstream broker start`` leaves running, and
its start/stop/status); ``secure`` adds a SASL_SSL listener. The names other code uses are
imported from here.
"""

from __future__ import annotations

from clipstream.streams.broker.detached import start_detached, status_detached, stop_detached
from clipstream.streams.broker.jars import BrokerError, resolve_jars
from clipstream.streams.broker.process import PEAK_JIT, EmbeddedBroker, new_cluster_id

__all__ = [
    "PEAK_JIT",
    "BrokerError",
    "EmbeddedBroker",
    "new_cluster_id",
    "resolve_jars",
    "start_detached",
    "status_detached",
    "stop_detached",
]
