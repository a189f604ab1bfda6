"""Topics are created deliberately, and an existing keyed topic's partition count is never
changed behind the operator's back (that would move keys away from their state)."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from clipstream.streams.wire import topics

pytestmark = pytest.mark.integration


def partitions_of(admin: AdminClient, name: str) -> int:
    return len(admin.list_topics(name, timeout=10).topics[name].partitions)


def test_a_core_topic_with_another_partition_count_is_refused_not_grown(kafka_settings):
    admin = AdminClient(kafka_settings.kafka())
    with pytest.raises(topics.PartitionMismatch) as refused:
        topics.ensure_topics(admin, topics.TopicPlan(8).core())
    message = str(refused.value)
    assert "another partition count than the 8 configured" in message
    assert "clipstream.queries (4)" in message
    assert "CLIPSTREAM_PARTITIONS=4" in message
    assert partitions_of(admin, topics.QUERIES) == 4  # left as it was
    assert partitions_of(admin, topics.SELECTION_CHANGELOG) == 4


def test_a_model_requests_topic_may_grow(kafka_settings):
    admin = AdminClient(kafka_settings.kafka())
    name = topics.model_requests("growing")
    topics.ensure_topics(admin, [NewTopic(name, 2, 1)], grow=True)
    topics.ensure_topics(admin, [NewTopic(name, 4, 1)], grow=True)
    assert partitions_of(admin, name) == 4


def test_queries_are_stamped_by_the_broker(kafka_settings):
    """A deadline need not trust the client's clock (clipstream.streams.worker.pipeline)."""
    from confluent_kafka.admin import ConfigResource

    admin = AdminClient(kafka_settings.kafka())
    resource = ConfigResource(ConfigResource.Type.TOPIC, topics.QUERIES)
    config = admin.describe_configs([resource])[resource].result(10)
    assert config["message.timestamp.type"].value == "LogAppendTime"
