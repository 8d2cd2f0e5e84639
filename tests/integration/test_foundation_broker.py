"""Envelopes through the real broker: aiokafka producer -> faust agent and plain consumer,
keys and per-key order preserved; poison messages dead-lettered while the stream moves on."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shared.events import parse_envelope
from shared.kafka import DeadLetter, make_producer, send_envelope
from shared.streams import StreamProcessor, envelope_topic, make_faust_app
from shared.topics import Topic, Topics
from tests import builders
from tests.apps import faust_running
from tests.infra import wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = [pytest.mark.integration, pytest.mark.smoke]


def _case_stream(n_cases: int, per_case: int):
    """n cases, each with `per_case` events in a known order."""
    out = []
    for _ in range(n_cases):
        first = builders.case_identified()
        out.append(builders.envelope(first))
        for i in range(per_case - 1):
            upd = builders.one_of_each()[1].model_copy(update={"case_id": first.case_id})
            out.append(builders.envelope(upd, id=uuid.UUID(int=i + 1 + uuid.uuid4().int % 10**12)))
    return out


async def test_envelopes_reach_a_faust_agent_and_a_plain_consumer_in_order_per_key(env):
    topics = Topics(env.topic_prefix)
    sent = _case_stream(n_cases=8, per_case=5)
    producer = make_producer(env)
    await producer.start()
    try:
        for e in sent:
            await send_envelope(producer, topics.case_events, e)
    finally:
        await producer.stop()

    # plain consumer
    records = await read_all(env, topics.case_events, min_count=len(sent))
    by_key: dict[bytes, list[str]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(str(parse_envelope(r.value).id))
    for key, ids in by_key.items():
        assert ids == [str(e.id) for e in sent if e.key == key], "order per key broken (plain consumer)"
    assert len(records) == len(sent)

    # faust agent
    app = make_faust_app(env, f"roundtrip-{uuid.uuid4().hex[:6]}")
    source = envelope_topic(app, topics, Topic.case_events)
    seen: dict[str, list[str]] = {}

    @app.agent(source, concurrency=1)
    async def collect(stream):
        async for event in stream.events():
            seen.setdefault(event.value.subject, []).append(str(event.value.id))
            assert event.message.key == event.value.key

    async with faust_running(app):
        await wait_until(lambda: sum(map(len, seen.values())) >= len(sent), timeout_s=60,
                         what="the faust agent to see every envelope")
    for subject, ids in seen.items():
        assert ids == [str(e.id) for e in sent if e.subject == subject], "order per key broken (faust)"


async def test_poison_messages_are_dead_lettered_and_the_partition_keeps_moving(env):
    topics = Topics(env.topic_prefix)
    good_before, good_after = builders.envelope(), builders.envelope()
    key = b"same-partition"
    broken = [
        b"{not json",
        b'{"specversion":"1.0","type":"case.exploded"}',
        builders.envelope().to_json_bytes().replace(b'"prizren"', b'"atlantis"'),
        "raise-me",
    ]
    items = [(key, good_before.to_json_bytes())]
    raise_id = builders.envelope()
    items += [(key, b) if isinstance(b, bytes) else (key, raise_id.to_json_bytes()) for b in broken]
    items += [(key, good_after.to_json_bytes())]
    await produce(env, topics.case_events, items)

    app = make_faust_app(env, f"poison-{uuid.uuid4().hex[:6]}")
    processed: list[str] = []
    letters: list[DeadLetter] = []
    proc = StreamProcessor(app=app, topics=topics, group="poison-test", on_dead_letter=letters.append)

    async def handler(envelope):
        if envelope.id == raise_id.id:
            raise ValueError("handler cannot apply this event")
        processed.append(str(envelope.id))

    @app.agent(envelope_topic(app, topics, Topic.case_events), concurrency=1)
    async def work(stream):
        await proc.run(stream, handler)

    async with faust_running(app):
        await wait_until(lambda: str(good_after.id) in processed, timeout_s=60,
                         what="the event behind the poison messages to be processed")
    assert processed == [str(good_before.id), str(good_after.id)]

    dlq = await read_all(env, topics.dead_letters, min_count=4)
    got = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in dlq]
    assert [g.reason for g in got] == ["invalid_json", "unknown_type", "invalid_envelope", "handler_error"]
    assert all(g.topic == topics.case_events for g in got)
    assert [g.offset for g in got] == [1, 2, 3, 4]
    assert len({g.partition for g in got}) == 1
    assert "data.municipality" in got[2].error
    assert "handler cannot apply" in got[3].error
    assert got[0].value == b"{not json"
