"""The outbox relay dies between sending a batch and marking it published: the restarted relay
sends the batch again, so duplicates reach the broker; none reach the referral database or the
analytics counts, because every consumer dedupes on the event id."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

import shared.outbox as outbox
from services.referral.rules import load_rules
from shared.db import create_pool, migrate_url
from shared.events import parse_envelope
from shared.kafka import make_producer
from shared.outbox import OutboxRelay, append, backlog
from shared.topics import Topic, Topics
from tests import builders
from tests.e2e.harness import running_system
from tests.infra import wait_until
from tests.kafka_helpers import consumed_to_the_end, read_all

pytestmark = pytest.mark.reliability

N = 60


class RelayKilled(Exception):
    pass


async def test_duplicates_from_a_relay_crash_reach_the_broker_but_not_the_state(tmp_path, monkeypatch):
    from pathlib import Path

    import services.intake

    async with running_system(tmp_path / "sys", services=("referral", "analytics")) as system:
        settings = system.settings
        topics = Topics(settings.topic_prefix)
        await migrate_url(settings.database_url, schema="intake",
                          folder=Path(services.intake.__file__).parent / "migrations")
        cases = [builders.case_identified(municipality="ferizaj") for _ in range(N)]
        pool = await create_pool(settings)
        async with pool.acquire() as conn:
            for case in cases:
                async with conn.transaction():
                    await append(conn, schema="intake", topic=Topic.case_events, envelope=builders.envelope(case))

        producer = make_producer(settings)
        await producer.start()
        try:
            real_publish = outbox._publish_rows

            async def send_then_die(*args, **kwargs):
                await real_publish(*args, **kwargs)
                raise RelayKilled("killed after the broker acked, before the rows were marked")

            monkeypatch.setattr(outbox, "_publish_rows", send_then_die)
            relay = OutboxRelay(pool=pool, schema="intake", producer=producer, topics=topics)
            with pytest.raises(RelayKilled):
                await relay.publish_batch()
            async with pool.acquire() as conn:
                assert (await backlog(conn, schema="intake"))["rows"] == N, "nothing was marked"
            monkeypatch.setattr(outbox, "_publish_rows", real_publish)
            restarted = OutboxRelay(pool=pool, schema="intake", producer=producer, topics=topics)
            assert await restarted.publish_batch() == N
        finally:
            await producer.stop()

        records = await read_all(settings, topics.case_events, min_count=2 * N)
        ids = [str(parse_envelope(r.value).id) for r in records]
        assert len(ids) == 2 * N and len(set(ids)) == N, "every event reached the broker twice"

        rules = load_rules()
        expected = sum(len(rules.route(c, at=builders.envelope(c).time)) for c in cases)
        conn = await asyncpg.connect(settings.database_url)
        try:
            async def referred():
                return await conn.fetchval("select count(*) from referral.referral") >= expected
            await wait_until(referred, timeout_s=60, what=f"{expected} referrals", interval_s=0.3)
            await wait_until(lambda: consumed_to_the_end(settings, topics.case_events, "referral", "analytics"),
                             timeout_s=60, what="referral and analytics to have applied every delivery",
                             interval_s=0.5)
            assert await conn.fetchval("select count(*) from referral.referral") == expected
            created = await conn.fetchval("select count(*) from referral.outbox where event_type = 'referral.created'")
            assert created == expected, "one referral.created per referral, not per delivery"
        finally:
            await conn.close()
            await pool.close()

        headers = system.headers(sub="coordinator.ferizaj", agency="coordinator", municipality="ferizaj",
                                 roles=["coordinator"])
        async with httpx.AsyncClient(timeout=10) as client:
            async def counted():
                r = await client.get(f"{system.url('analytics')}/v1/counts/municipalities/ferizaj", headers=headers)
                return r.json()["identified"]
            await wait_until(lambda: _at_least(counted, N), timeout_s=60, what=f"analytics to count {N}")
            assert await counted() == N, "a duplicate delivery was counted twice"
        print(f"\n[reliability] {2 * N} deliveries of {N} events -> {expected} referrals, analytics {N}")


async def _at_least(fn, n: int) -> bool:
    return (await fn()) >= n
