"""Topic names and their explicit creation (never broker auto-create)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

QUERIES = "clipstream.queries"
PREDICTIONS = "clipstream.predictions"
FEEDBACK = "clipstream.feedback"
RESPONSES = "clipstream.model.responses"
DEADLETTER = "clipstream.deadletter"
CONTROL = "clipstream.control"


def model_requests(model: str) -> str:
    return f"clipstream.model.{model}.requests"


def model_group(model: str) -> str:
    return f"clipstream-model-{model}"


@dataclass(frozen=True)
class TopicPlan:
    """Partition counts. Queries, responses and feedback share one count: Faust
    co-partitions topics of equal partition count, which is what routes a model's
    answer and a query's feedback to the worker holding that query's state."""

    partitions: int = 4
    retention_ms: int = 7 * 24 * 3600 * 1000

    def core(self) -> list[NewTopic]:
        p = self.partitions
        keep = {"retention.ms": str(self.retention_ms)}
        return [
            NewTopic(QUERIES, p, 1, config=keep),
            NewTopic(RESPONSES, p, 1, config={"retention.ms": str(3600 * 1000)}),
            NewTopic(FEEDBACK, p, 1, config=keep),
            NewTopic(PREDICTIONS, p, 1, config=keep),
            NewTopic(DEADLETTER, 1, 1, config=keep),
            NewTopic(CONTROL, 1, 1, config={"cleanup.policy": "compact"}),
        ]


def ensure_topics(admin: AdminClient, topics: list[NewTopic], timeout: float = 30.0) -> None:
    """Create the topics that are missing; grow partitions that are too few.

    An existing topic with fewer partitions than planned would break co-partitioning, so it
    is grown rather than silently used."""
    existing = admin.list_topics(timeout=timeout).topics
    missing = [t for t in topics if t.topic not in existing]
    if missing:
        for _name, future in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: a concurrent creator won
                    raise
    grow = [
        NewPartitions(t.topic, t.num_partitions)
        for t in topics
        if t.topic in existing and len(existing[t.topic].partitions) < t.num_partitions
    ]
    if grow:
        for future in admin.alter_partitions(grow).values():
            future.result(timeout)
    wait_for_topics(admin, [t.topic for t in topics], timeout)


def wait_for_topics(admin: AdminClient, names: list[str], timeout: float = 30.0) -> None:
    """Block until every topic has leaders for all partitions (metadata catches up)."""
    import time

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
