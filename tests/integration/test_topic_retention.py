"""The topics on the broker carry the registry's retention (issue 15): `ensure_topics` creates
clms.agency-inbound and clms.dead-letters with a short retention.ms, the event topics keep
everything. Read back from the broker itself (DescribeConfigs), not from our own code."""

from __future__ import annotations

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.kafka import make_admin
from shared.topics import REGISTRY, Topics, topic_configs

pytestmark = pytest.mark.integration


async def broker_configs(settings, names: list[str]) -> dict[str, dict[str, str]]:
    admin = make_admin(settings)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for _code, _msg, _rtype, name, entries in response.resources:
            out[name] = {e[0]: e[1] for e in entries}
    return out


async def test_topics_are_created_with_the_registrys_retention_and_cleanup_policy(env):
    if env.kafka_broker_kind == "tansu":
        pytest.skip("Tansu keeps nothing and enforces no retention (DESIGN.md, known limits)")
    topics = Topics(env.topic_prefix)
    got = await broker_configs(env, topics.all())
    day = 86_400_000
    assert got[topics.agency_inbound]["retention.ms"] == str(3 * day)
    assert got[topics.dead_letters]["retention.ms"] == str(14 * day)
    assert got[topics.case_events]["retention.ms"] == "-1"
    for spec in REGISTRY:
        name = topics.name(spec.topic)
        for key, value in topic_configs(spec).items():
            assert got[name][key] == value, (name, key)
