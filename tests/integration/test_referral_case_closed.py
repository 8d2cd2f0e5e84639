"""A closed case closes its open referrals: each gets `referral.closed`, and none of them runs
into its deadline and an escalation afterwards."""

from __future__ import annotations

from datetime import date, timedelta

import asyncpg
import pytest

from services.referral.app import create_app
from services.referral.service import escalate_due
from shared import events as ev
from shared.events import parse_envelope
from shared.kafka import make_producer, send_envelope
from shared.topics import Topics
from tests import builders
from tests.apps import running
from tests.infra import wait_until
from tests.integration.test_referral_deadlines import Clock
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration


async def test_a_closed_case_closes_its_open_referrals_and_stops_their_deadlines(env):
    env = env.model_copy(update={"referral_deadline_poll_s": 0.05})
    topics = Topics(env.topic_prefix)
    clock = Clock()

    case = builders.case_identified(municipality="prizren")
    opened = builders.envelope(case)
    closed = opened.follow(ev.CaseClosed(case_id=case.case_id, municipality="prizren", on=date.today(),
                                         confirmed_by_agency=ev.AgencyType.csw,
                                         reason=ev.CaseClosedReason.moved_away), source="csw/prizren")
    app = create_app(env, clock=clock)
    async with running(app):
        producer = make_producer(env)
        await producer.start()
        try:
            await send_envelope(producer, topics.case_events, opened)
            await send_envelope(producer, topics.case_events, closed)
            await send_envelope(producer, topics.case_events, closed)  # redelivered
        finally:
            await producer.stop()
        conn = await asyncpg.connect(env.database_url)
        try:
            async def all_closed():
                rows = await conn.fetch("select status from referral.referral where case_id = $1", case.case_id)
                return rows if rows and all(r["status"] == "closed" for r in rows) else None
            rows = await wait_until(all_closed, timeout_s=30, what="the case's referrals to close")
            clock.offset = timedelta(days=30)  # far past every deadline
            await clock.scanned()  # a whole deadline scan of the running service ran with that clock
            assert await conn.fetchval("select count(*) from referral.referral where overdue or escalated") == 0
            # and one more scan here, which would raise if the scans were failing (a failing scan
            # escalates nothing either): it finds nothing due
            assert await escalate_due(app.state.deps) == 0
        finally:
            await conn.close()
    events = [parse_envelope(r.value) for r in await read_all(env, topics.referral_events, min_count=2 * len(rows))]
    types = [e.type for e in events]
    assert types.count("referral.closed") == len(rows) == types.count("referral.created")
    assert "referral.overdue" not in types and "referral.escalated" not in types
    closed_events = [e for e in events if e.type == "referral.closed"]
    assert all(e.data.case_reason is ev.CaseClosedReason.moved_away and e.correlationid == opened.correlationid
               for e in closed_events)
