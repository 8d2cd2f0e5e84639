"""Operator tools on the real broker: dead letters listed and replayed (once), a case traced
across topics, consumer lag per partition."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from clms.ops import REPLAY_HEADER, consumer_lag, dead_letters, replay_dead_letters, summarise, trace_case
from shared.events import parse_envelope
from shared.kafka import DeadLetter, dead_letter, make_consumer, make_producer, send_envelope
from shared.topics import Topics
from tests import builders
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration


async def test_dead_letters_are_summarised_and_a_fixed_event_is_replayed_once(env):
    import asyncpg
    import getpass

    topics = Topics(env.topic_prefix)
    good = builders.envelope()
    referral = env.group_id("referral")
    producer = make_producer(env)
    await producer.start()
    try:
        # the originals really are on clms.case-events, where the dead letters' headers point
        values = [b"{not json", b"{not json", good.to_json_bytes()]
        originals = [await producer.send_and_wait(topics.case_events, v, key=good.key) for v in values]
        for meta, value, reason in zip(originals, values, ["invalid_json", "invalid_json", "handler_error"]):
            await dead_letter(producer, topics, DeadLetter(
                topic=topics.case_events, partition=meta.partition, offset=meta.offset, key=good.key,
                value=value, reason=reason,
                error="invalid JSON at position 1" if reason == "invalid_json" else "KeyError: x", group=referral))
    finally:
        await producer.stop()

    letters = await dead_letters(env)
    assert len(letters) == 3
    summary = {s.reason: s.count for s in summarise(letters)}
    assert summary == {"invalid_json": 2, "handler_error": 1}
    broken = next(d for d in letters if d.letter.reason == "invalid_json")
    assert broken.letter.topic == topics.case_events and broken.letter.group == referral

    with pytest.raises(ValueError, match="not a valid envelope"):
        await replay_dead_letters(env, ids=[broken.id], fixed_value=b'{"id": 1}')
    result = await replay_dead_letters(env, ids=[broken.id], fixed_value=good.to_json_bytes())
    assert result.replayed == [broken.id] and result.operator == f"os:{getpass.getuser()}"
    again = await replay_dead_letters(env, ids=[broken.id], fixed_value=good.to_json_bytes())
    assert again.replayed == [] and again.skipped_already_replayed == [broken.id]
    by_reason = await replay_dead_letters(env, reason="handler_error")
    assert len(by_reason.replayed) == 1

    records = await read_all(env, topics.case_events, min_count=5)
    replayed = [r for r in records if dict(r.headers).get(REPLAY_HEADER)]
    assert len(replayed) == 2
    assert {str(parse_envelope(r.value).id) for r in replayed} == {str(good.id)}
    assert {dict(r.headers)["dlq_replayed_by"] for r in replayed} == {f"os:{getpass.getuser()}".encode()}
    conn = await asyncpg.connect(env.database_url)
    try:
        assert {r["replayed_by"] for r in await conn.fetch("select replayed_by from ops.dlq_replays")} == {
            f"os:{getpass.getuser()}"}
    finally:
        await conn.close()


async def test_replay_refuses_dead_letters_whose_headers_do_not_check_out(env):
    """issue 16: anyone who may write clms.dead-letters could name any topic in its headers; replay
    publishes only to a registry topic read by the named group, and only what really is there."""
    topics = Topics(env.topic_prefix)
    good = builders.envelope()
    forged = builders.envelope()
    producer = make_producer(env)
    await producer.start()
    try:
        real = await producer.send_and_wait(topics.case_events, good.to_json_bytes(), key=good.key)
        cases = [
            # an invented event injected into case-events, pointing at a real position
            DeadLetter(topic=topics.case_events, partition=real.partition, offset=real.offset, key=good.key,
                       value=forged.to_json_bytes(), reason="handler_error", error="x",
                       group=env.group_id("referral")),
            # a group that does not read that topic
            DeadLetter(topic=topics.case_events, partition=real.partition, offset=real.offset, key=good.key,
                       value=good.to_json_bytes(), reason="handler_error", error="x",
                       group=env.group_id("notifications")),
            # a topic outside the registry
            DeadLetter(topic="elsewhere", partition=0, offset=0, key=good.key, value=good.to_json_bytes(),
                       reason="handler_error", error="x", group=env.group_id("referral")),
            # an original that is not there
            DeadLetter(topic=topics.case_events, partition=real.partition, offset=real.offset + 50, key=good.key,
                       value=good.to_json_bytes(), reason="handler_error", error="x",
                       group=env.group_id("referral")),
        ]
        for letter in cases:
            await dead_letter(producer, topics, letter)
    finally:
        await producer.stop()
    result = await replay_dead_letters(env, reason="handler_error")
    assert result.replayed == []
    whys = [why for _, why in sorted(result.refused, key=lambda x: int(x[0].split(":")[1]))]
    assert len(whys) == 4, result
    joined = " | ".join(whys)
    assert "value differs" in joined and "does not read" in joined and "not a topic of this deployment" in joined
    assert "no longer at" in joined
    records = await read_all(env, topics.case_events, min_count=1)
    assert len(records) == 1  # nothing was published


async def test_trace_tells_one_case_in_order_without_duplicates(env):
    topics = Topics(env.topic_prefix)
    items = builders.one_of_each()
    case_id = items[0].case_id
    first = builders.envelope(items[0])
    chain = [first]
    for data in items[1:]:
        if getattr(data, "case_id", None) is None:
            continue
        data = data.model_copy(update={"case_id": case_id})
        chain.append(chain[-1].follow(data, source="test", subject=str(case_id)))
        await asyncio.sleep(0.002)  # distinct times
    other = builders.envelope()
    producer = make_producer(env)
    await producer.start()
    try:
        for e in chain + [chain[1], other]:  # chain[1] twice: an at-least-once duplicate
            topic = {"case": topics.case_events, "referral": topics.referral_events,
                     "notification": topics.notification_events}[e.type.split(".")[0]]
            await send_envelope(producer, topic, e)
    finally:
        await producer.stop()
    story = await trace_case(env, case_id)
    assert [ln.event_id for ln in story] == [str(e.id) for e in chain]
    assert {ln.correlation_id for ln in story} == {first.correlationid}
    assert {ln.topic for ln in story} == {topics.case_events, topics.referral_events, topics.notification_events}


async def test_lag_shows_what_a_group_has_not_consumed(env):
    topics = Topics(env.topic_prefix)
    producer = make_producer(env)
    await producer.start()
    try:
        for _ in range(5):
            await send_envelope(producer, topics.case_events, builders.envelope())
    finally:
        await producer.stop()
    consumer = make_consumer(env, topics.case_events, group="lagtest")
    await consumer.start()
    try:
        got = 0
        for _ in range(100):
            batch = await consumer.getmany(timeout_ms=200)
            got += sum(len(v) for v in batch.values())
            if got >= 5:
                break
        assert got == 5
        await consumer.commit()
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
    producer = make_producer(env)
    await producer.start()
    try:
        for _ in range(3):
            await send_envelope(producer, topics.case_events, builders.envelope())
    finally:
        await producer.stop()
    rows = [r for r in await consumer_lag(env) if r.group == env.group_id("lagtest")]
    assert rows, "the group's committed offsets are listed"
    assert sum(r.lag for r in rows) == 3
