"""Topic names and their explicit creation (never broker auto-create)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

QUERIES = "clipstream.queries"
PREDICTIONS = "clipstream.predictions"
FEEDBACK = "clipstream.feedback"
RESPONSES = "clipstream.model.responses"
DEADLETTER = "clipstream.deadletter"
CONTROL = "clipstream.control"
#: feedback joined with its query's answers, keyed by selection key (learning.learner)
OBSERVATIONS = "clipstream.observations"
#: the worker group's Faust app id: its selection table's changelog is named after it
FAUST_APP = "clipstream"
SELECTION_TABLE = "selection"
SELECTION_CHANGELOG = f"{FAUST_APP}-{SELECTION_TABLE}-changelog"
#: the consumer group whose members serve queries (clipstream.streams.worker.serving)
SERVING_GROUP = "clipstream-serving"


@lru_cache(maxsize=65_536)
def partition_for(key: str, partitions: int) -> int:
    """The partition of a selection key on clipstream.observations and the selection
    table's changelog: Kafka's default partitioner (murmur2), the one Faust's producer
    applies to the table's keys, so a key's observations and its state share a partition
    and so an owner."""
    # imported here: the SDK imports this module and installs without aiokafka
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def model_requests(model: str) -> str:
    return f"clipstream.model.{model}.requests"


def model_group(model: str) -> str:
    return f"clipstream-model-{model}"


class PartitionMismatch(RuntimeError):
    """An existing topic has another partition count than the cluster's plan."""


@dataclass(frozen=True)
class TopicPlan:
    """Partition counts. Queries, responses, feedback and predictions share one count: a
    query, its model answers, its feedback and its prediction all live on the same
    partition number (worker.serving). Observations and the selection table's changelog
    share it too: the worker given a key's observations partition writes the key's state
    to the same partition number of the changelog (clipstream.streams.learning.learner)."""

    partitions: int = 4
    retention_ms: int = 7 * 24 * 3600 * 1000

    def core(self) -> list[NewTopic]:
        p = self.partitions
        keep = {"retention.ms": str(self.retention_ms)}
        return [
            # the broker's clock stamps each query, so a deadline need not trust the
            # client's clock (clipstream.streams.worker.pipeline)
            NewTopic(QUERIES, p, 1, config={**keep, "message.timestamp.type": "LogAppendTime"}),
            NewTopic(RESPONSES, p, 1, config={"retention.ms": str(3600 * 1000)}),
            NewTopic(FEEDBACK, p, 1, config=keep),
            NewTopic(PREDICTIONS, p, 1, config=keep),
            NewTopic(OBSERVATIONS, p, 1, config=keep),
            NewTopic(SELECTION_CHANGELOG, p, 1, config={"cleanup.policy": "compact"}),
            NewTopic(DEADLETTER, 1, 1, config=keep),
            NewTopic(CONTROL, 1, 1, config={"cleanup.policy": "compact"}),
        ]


def ensure_topics(
    admin: AdminClient, topics: list[NewTopic], timeout: float = 30.0, *, grow: bool = False
) -> None:
    """Create the topics that are missing.

    An existing topic with another partition count is refused (``grow=False``): adding
    partitions to a keyed topic remaps its keys, which would move selection state and
    answered queries away from the records that need them. Topics whose keys carry no
    state (a model's requests) may be grown with ``grow=True``."""
    existing = admin.list_topics(timeout=timeout).topics
    missing = [t for t in topics if t.topic not in existing]
    if missing:
        for _name, future in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: a concurrent creator won
                    raise
    present = {t.topic: len(existing[t.topic].partitions) for t in topics if t.topic in existing}
    wrong = [t for t in topics if t.topic in present and present[t.topic] != t.num_partitions]
    if grow:
        smaller = [t for t in wrong if present[t.topic] < t.num_partitions]
        if smaller:
            for future in admin.create_partitions(
                [NewPartitions(t.topic, t.num_partitions) for t in smaller]
            ).values():
                future.result(timeout)
    elif wrong:
        found = ", ".join(f"{t.topic} ({present[t.topic]})" for t in wrong)
        raise PartitionMismatch(
            f"existing topics have another partition count than the {wrong[0].num_partitions} "
            f"configured: {found}; set CLIPSTREAM_PARTITIONS={present[wrong[0].topic]} to "
            "match the cluster (changing the count of existing topics would move keys away "
            "from their state)"
        )
    wait_for_topics(admin, [t.topic for t in topics], timeout)


def wait_for_topics(admin: AdminClient, names: list[str], timeout: float = 30.0) -> None:
    """Block until every topic has leaders for all partitions (metadata catches up)."""
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=timeout).topics
        ready = all(
            n in md
            and md[n].error is None
            and md[n].partitions
            and all(p.leader >= 0 for p in md[n].partitions.values())
            for n in names
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not ready after {timeout}s: {names}")
        time.sleep(0.05)
