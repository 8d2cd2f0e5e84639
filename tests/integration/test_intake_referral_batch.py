"""Intake applies the referral events it consumes (who holds a referral for a case, and so may
read it) a batch per transaction, with the per-event policy kept: a malformed record and an event
the database refuses are dead-lettered with their reason, every other event of the same batch
still takes effect, and a redelivered one changes nothing."""

from __future__ import annotations

import uuid

import asyncpg

from shared.kafka import DLQ_HEADER_OFFSET, DLQ_HEADER_REASON
from shared.topics import Topics
from services.intake.app import create_app
from tests import builders
from tests.apps import running
from tests.infra import wait_until
from tests.kafka_helpers import consumed_to_the_end, produce, read_all


def created(office_id: str = "csw.prizren"):
    data = builders.one_of_each()[5].model_copy(update={"case_id": uuid.uuid4(), "referral_id": uuid.uuid4(),
                                                         "office_id": office_id})
    return builders.envelope(data, source="referral")


async def test_one_bad_event_in_a_batch_is_dead_lettered_and_the_others_apply(env):
    topics = Topics(env.topic_prefix)
    first, refused, last = created(), created("csw.prizren\x00"), created()  # PostgreSQL refuses a NUL in text
    records = [first.to_json_bytes(), b"{not an envelope", refused.to_json_bytes(), last.to_json_bytes(),
               first.to_json_bytes()]
    # one key: one partition, in this order, all there before intake starts: one fetched batch
    await produce(env, topics.referral_events, [(b"one-partition", value) for value in records])

    async with running(create_app(env)):
        async def consumed():
            return await consumed_to_the_end(env, topics.referral_events, "intake")
        await wait_until(consumed, timeout_s=30, what="intake to consume every referral event")

    conn = await asyncpg.connect(env.database_url)
    try:
        rows = await conn.fetch("select referral_id from intake.case_access")
    finally:
        await conn.close()
    assert sorted(r["referral_id"] for r in rows) == sorted([first.data.referral_id, last.data.referral_id])
    letters = await read_all(env, topics.dead_letters, min_count=2)
    by_offset = {int(dict(r.headers)[DLQ_HEADER_OFFSET]): dict(r.headers)[DLQ_HEADER_REASON].decode()
                 for r in letters}
    assert set(by_offset) == {1, 2}, by_offset
    assert by_offset[1] != "handler_error" and by_offset[2] == "handler_error"
