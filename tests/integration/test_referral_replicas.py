"""Several replicas on one real Postgres: concurrent deliveries of one case event open one set
of referrals, and concurrent deadline scanners (`FOR UPDATE SKIP LOCKED`) escalate each overdue
referral exactly once. Use cases called directly (no broker needed for this property)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from services.referral import service
from services.referral.app import MIGRATIONS
from services.referral.deps import Deps
from services.referral.rules import load_rules
from shared.db import create_pool, migrate
from tests import builders

pytestmark = pytest.mark.integration


async def test_concurrent_replicas_open_once_and_escalate_once(env):
    pool = await create_pool(env, min_size=1, max_size=8)
    try:
        async with pool.acquire() as conn:
            await migrate(conn, schema=service.SCHEMA, folder=MIGRATIONS)
        now = datetime.now(timezone.utc)
        replicas = [Deps(pool=pool, rules=load_rules(), clock=lambda: now) for _ in range(3)]

        envelopes = [builders.envelope(builders.case_identified()) for _ in range(20)]
        # every replica receives every event at the same time (a rebalance redelivering a batch)
        opened = await asyncio.gather(*[service.apply_case_event(d, envelope=e)
                                        for e in envelopes for d in replicas])
        assert sum(len(o) for o in opened) == 40, "csw + education per case, once"

        later = now + timedelta(days=4)
        replicas = [replace(d, clock=lambda: later) for d in replicas]  # Deps is frozen

        async def drain(d: Deps) -> int:
            total = 0
            while n := await service.escalate_due(d, limit=3):
                total += n
            return total

        counts = await asyncio.gather(*[drain(d) for d in replicas])
        assert sum(counts) == 40
        assert await asyncio.gather(*[service.escalate_due(d) for d in replicas]) == [0, 0, 0]
        async with pool.acquire() as conn:
            per_type = dict(await conn.fetch(
                "select event_type, count(*) from referral.outbox group by event_type"))
            twice = await conn.fetchval(
                "select count(*) from (select referral_id from referral.referral_history "
                "where action = 'overdue' group by referral_id having count(*) > 1) x")
        assert per_type == {"referral.created": 40, "referral.overdue": 40, "referral.escalated": 40}
        assert twice == 0
    finally:
        await pool.close()
