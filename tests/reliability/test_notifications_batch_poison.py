"""A batch of referral events in which one event is poison: the notifications worker applies the
batch in one transaction, that transaction fails, and the worker applies the events again one by
one: the poison is dead-lettered (once, with its offset), every other event is applied exactly
once (one inbox row, one alert per duty officer) and the partition moves on.

The poison is a real one, not an injected error: a `referral.created` that is a valid envelope
but whose `reported_by` holds a NUL character, which PostgreSQL refuses to store (a bug in a
producer). A copy of the first event is in the batch twice (the outbox relay publishes at least
once): it is applied once.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from services.notifications import service
from services.notifications.app import create_app
from shared import events as ev
from shared.kafka import DeadLetter
from shared.topics import Topics
from tests.apps import running
from tests.infra import db_rows, wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.reliability


def created(reported_by: str = "police.prizren.duty") -> ev.Envelope:
    data = ev.ReferralCreated(
        referral_id=uuid.uuid4(), case_id=uuid.uuid4(), municipality="prizren", agency="csw",
        office_id="csw.prizren", rule_id="csw-every-child", rule_version=1, priority="normal",
        deadline=datetime.now(timezone.utc) + timedelta(hours=24), legal_basis="Law 06/L-084",
        age_band=ev.AgeBand.from_10_to_14, sector=ev.Sector.begging, reported_by=reported_by)
    return ev.Envelope.wrap(data, source="referral", subject=data.case_id)


async def test_a_poison_event_in_a_batch_is_dead_lettered_and_the_others_applied_once(env, monkeypatch):
    topics = Topics(env.topic_prefix)
    good = [created() for _ in range(5)]
    poison = created(reported_by="police.prizren\x00duty")
    sequence = [good[0], good[1], good[0], poison, good[2], good[3], good[4]]  # good[0] delivered twice
    key = b"one-partition"  # one partition: the events come in this order, as one batch
    await produce(env, topics.referral_events, [(key, e.to_json_bytes()) for e in sequence])
    poison_offset = sequence.index(poison)

    batches: list[list[uuid.UUID]] = []
    real_batch = service.record_events

    async def record_events(conn, *, items, settings):
        batches.append([e.id for e, _ in items])
        return await real_batch(conn, items=items, settings=settings)

    monkeypatch.setattr(service, "record_events", record_events)
    async with running(create_app(env)):
        async def dead_lettered():
            records = await read_all(env, topics.dead_letters, min_count=1, timeout_s=2)
            return [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in records]
        await wait_until(dead_lettered, timeout_s=60, what="the poison to be dead-lettered")
        await wait_until(lambda: inboxed(env, [e.id for e in good]), timeout_s=60,
                         what="every good event of the batch to be applied")
        await asyncio.sleep(0)

    assert any(poison.id in b and len(b) > 1 for b in batches), (
        f"the poison came in a batch with other events (batches: {[len(b) for b in batches]})")
    letters = await dead_lettered()
    assert [(lt.reason, lt.offset, lt.group) for lt in letters] == [
        ("handler_error", poison_offset, env.group_id("notifications"))], letters
    assert ev.parse_envelope(letters[0].value).id == poison.id

    rows = await db_rows(env, "select event_id from notifications.inbox")
    assert sorted(r["event_id"] for r in rows) == sorted(e.id for e in good), "each good event applied once, not the poison"
    alerts = await db_rows(env, "select referral_id, recipient, count(*) as n from notifications.alerts "
                           "group by referral_id, recipient")
    assert sorted((r["referral_id"], r["recipient"], r["n"]) for r in alerts) == sorted(
        (e.data.referral_id, "csw.prizren.duty", 1) for e in good), "one alert per duty officer and referral"
    by_event = await db_rows(env, "select event_id, count(*) as n from notifications.notifications group by event_id")
    counts = {r["event_id"]: r["n"] for r in by_event}
    assert set(counts) == {e.id for e in good} and len(set(counts.values())) == 1, counts
    sent = await db_rows(env, "select count(*) as n from notifications.outbox where event_type = 'notification.sent'")
    assert sent[0]["n"] == len(good), "one notification.sent per in-app alert, none twice"
    print(f"\n[reliability] batch of {len(sequence)} with a poison at offset {poison_offset}: batches "
          f"{[len(b) for b in batches]}, poison dead-lettered, {len(good)} events applied once each")


async def inboxed(env, ids: list[uuid.UUID]) -> bool:
    try:
        rows = await db_rows(env, "select event_id from notifications.inbox")
    except asyncpg.UndefinedTableError:
        return False
    return {r["event_id"] for r in rows} >= set(ids)
