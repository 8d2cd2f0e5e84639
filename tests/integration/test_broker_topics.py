"""On Apache Kafka: the analytics table's changelog is compacted (a table's history is its latest
value per key), and producers are idempotent."""

from __future__ import annotations

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.analytics.rebuild import changelog_topic, declare_changelog
from shared.kafka import make_admin, make_producer
from tests.infra import wait_until

pytestmark = pytest.mark.integration


async def test_the_analytics_changelog_is_compacted(env, infra):
    if infra.is_tansu:
        pytest.skip("Tansu has no compaction")
    await declare_changelog(env, "analytics")
    admin = make_admin(env)
    await admin.start()
    try:
        async def configs():  # a new topic reaches the broker's metadata a moment after creation
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, changelog_topic(env, "analytics"))])
            return {entry[0]: entry[1] for resource in response.resources for entry in resource[4]}
        found = await wait_until(configs, timeout_s=20, what="the changelog's topic configs")
    finally:
        await admin.close()
    assert found["cleanup.policy"] == "compact"


async def test_producers_are_idempotent_on_apache_kafka(env, infra):
    if infra.is_tansu:
        pytest.skip("Tansu rejects the idempotent producer (shared/tansu.py)")
    producer = make_producer(env)
    await producer.start()
    try:
        assert producer._txn_manager is not None, "aiokafka keeps a producer id only when idempotent"
        await producer.send_and_wait(f"{env.topic_prefix}clms.dead-letters", b"probe", key=b"k")
        assert producer._txn_manager.producer_id >= 0
    finally:
        await producer.stop()
