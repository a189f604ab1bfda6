"""Topic names and their explicit creation (never broker auto-create)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from clipstream.streams.wire import partitioner

if TYPE_CHECKING:
    from clipstream.streams.wire.config import Settings

QUERIES = "clipstream.queries"
PREDICTIONS = "clipstream.predictions"
FEEDBACK = "clipstream.feedback"
RESPONSES = "clipstream.model.responses"
DEADLETTER = "clipstream.deadletter"
CONTROL = "clipstream.control"
#: feedback joined with its query's answers, keyed by selection key (learning.learner)
OBSERVATIONS = "clipstream.observations"
#: the selection states, compacted, keyed by selection key (learning.learner). The name is
#: the one the topic had when a Faust table ("<app id>-<table>-changelog") held the states,
#: kept because existing deployments hold their learnt state in it: a new name would start
#: every app's selection from scratch
SELECTION_CHANGELOG = "clipstream-selection-changelog"
#: the consumer group whose members serve queries (clipstream.streams.worker.serving)
SERVING_GROUP = "clipstream-serving"


@lru_cache(maxsize=65_536)
def partition_for(key: str, partitions: int) -> int:
    """The partition of a selection key on clipstream.observations and the selection
    changelog: Kafka's default partitioner (murmur2 of the key's UTF-8, as the Java
    client and librdkafka's ``murmur2_random`` compute it), so a key's observations and its
    state share a partition and so an owner."""
    return partitioner.partition(key.encode(), partitions)


def model_requests(model: str) -> str:
    return f"clipstream.model.{model}.requests"


def model_group(model: str) -> str:
    return f"clipstream-model-{model}"


class TopicRefused(RuntimeError):
    """An existing topic does not fit the plan; the message says what to do."""


class PartitionMismatch(TopicRefused):
    """An existing topic has another partition count than the cluster's plan."""


class ReplicationTooLow(TopicRefused):
    """An existing topic has fewer replicas per partition than the plan asks for."""


@dataclass(frozen=True)
class TopicPlan:
    """Partition counts. Queries, responses, feedback and predictions share one count: a
    query, its model answers, its feedback and its prediction all live on the same
    partition number (worker.serving). Observations and the selection table's changelog
    share it too: the worker given a key's observations partition writes the key's state
    to the same partition number of the changelog (clipstream.streams.learning.learner)."""

    partitions: int = 4
    retention_ms: int = 7 * 24 * 3600 * 1000
    #: replicas per partition; 0: the cluster's ``default.replication.factor``, so a
    #: three-broker cluster set up for durability gets its 3 without a setting here
    replication: int = 0
    #: ``min.insync.replicas`` of clipstream's topics; 0: the cluster's own
    min_insync: int = 0

    @classmethod
    def of(cls, settings: Settings) -> TopicPlan:
        return cls(
            settings.partitions,
            replication=settings.replication_factor,
            min_insync=settings.min_insync_replicas,
        )

    def topic(self, name: str, partitions: int, config: dict[str, str] | None = None) -> NewTopic:
        """A topic of this plan: its replication, and its min.insync.replicas if set."""
        config = dict(config or {})
        if self.min_insync:
            config["min.insync.replicas"] = str(self.min_insync)
        # -1 asks the broker for its default.replication.factor (CreateTopics v4+)
        return NewTopic(name, partitions, self.replication or -1, config=config)

    def core(self) -> list[NewTopic]:
        p, topic = self.partitions, self.topic
        keep = {"retention.ms": str(self.retention_ms)}
        return [
            # the broker's clock stamps each query, so a deadline need not trust the
            # client's clock (clipstream.streams.worker.pipeline)
            topic(QUERIES, p, {**keep, "message.timestamp.type": "LogAppendTime"}),
            topic(RESPONSES, p, {"retention.ms": str(3600 * 1000)}),
            topic(FEEDBACK, p, keep),
            topic(PREDICTIONS, p, keep),
            topic(OBSERVATIONS, p, keep),
            topic(SELECTION_CHANGELOG, p, {"cleanup.policy": "compact"}),
            topic(DEADLETTER, 1, keep),
            topic(CONTROL, 1, {"cleanup.policy": "compact"}),
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
    check_replication(admin, [t for t in topics if t.topic in existing], timeout)
    wait_for_topics(admin, [t.topic for t in topics], timeout)


def cluster_default_replication(admin: AdminClient, timeout: float = 30.0) -> int:
    """The cluster's ``default.replication.factor``, as one of its brokers reports it."""
    broker = next(iter(admin.list_topics(timeout=timeout).brokers))
    resource = ConfigResource(ResourceType.BROKER, str(broker))
    entries = admin.describe_configs([resource])[resource].result(timeout)
    return int(entries["default.replication.factor"].value)


def check_replication(admin: AdminClient, topics: list[NewTopic], timeout: float = 30.0) -> None:
    """Refuse existing topics with fewer replicas than planned: on a cluster, a topic left
    at one replica loses its partitions' records and availability with one broker."""
    if not topics:
        return
    default: int | None = None
    metadata = admin.list_topics(timeout=timeout).topics
    short = []
    for t in topics:
        wanted = t.replication_factor
        if wanted <= 0:
            if default is None:
                default = cluster_default_replication(admin, timeout)
            wanted = default
        partitions = metadata[t.topic].partitions.values()
        have = min((len(p.replicas) for p in partitions), default=wanted)
        if have < wanted:
            short.append((t.topic, have, wanted))
    if short:
        found = ", ".join(f"{name} ({have})" for name, have, _ in short)
        raise ReplicationTooLow(
            f"existing topics have fewer replicas than the {short[0][2]} configured: {found}; "
            "add replicas with kafka-reassign-partitions.sh, or set "
            f"CLIPSTREAM_REPLICATION_FACTOR={min(h for _, h, _ in short)} to run with fewer"
        )


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
