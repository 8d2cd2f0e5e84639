"""Outbox and inbox retention on the real PostgreSQL: published outbox rows and dedupe rows past
their window are removed in batches, unpublished and recent rows are kept, the removals are
counted, and every service that owns an outbox runs the retention task."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from shared.db import create_pool, migrate
from shared.metrics import STREAMS
from shared.outbox import apply_retention, remove_expired
from tests.apps import running
from tests.infra import wait_until

pytestmark = pytest.mark.integration


def removed_total(table: str) -> float:
    return STREAMS.get_sample_value("clms_retention_removed_total", {"table": table}) or 0.0


async def add_outbox(conn: asyncpg.Connection, schema: str, n: int, *, age: str, published: bool) -> None:
    await conn.execute(
        f"insert into {schema}.outbox(event_id, topic, key, event_type, envelope, created_at, published_at) "
        "select gen_random_uuid(), 'clms.case-events', gen_random_uuid()::text, 'case.identified', '{}'::jsonb, "
        f"now() - $1::text::interval, case when $2 then now() - $1::text::interval end from generate_series(1, $3)",
        age, published, n)


async def add_inbox(conn: asyncpg.Connection, schema: str, n: int, *, age: str) -> None:
    await conn.execute(
        f"insert into {schema}.inbox(event_id, consumer, event_type, applied_at) "
        "select gen_random_uuid(), 'test', 'case.identified', now() - $1::text::interval from generate_series(1, $2)",
        age, n)


async def counts(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    row = await conn.fetchrow(
        f"select (select count(*) from {schema}.outbox where published_at is null) as unpublished, "
        f"(select count(*) from {schema}.outbox where published_at is not null) as published, "
        f"(select count(*) from {schema}.inbox) as inbox")
    return dict(row)


@pytest.fixture
async def pool(env, tmp_path: Path):
    pool = await create_pool(env)
    async with pool.acquire() as conn:
        await migrate(conn, schema="ret", folder=tmp_path)  # the shared outbox and inbox only
    yield pool
    await pool.close()


async def test_old_published_outbox_rows_go_in_batches_unpublished_and_recent_ones_stay(pool):
    async with pool.acquire() as conn:
        await add_outbox(conn, "ret", 2500, age="10 days", published=True)
        await add_outbox(conn, "ret", 3, age="10 days", published=False)  # the relay has not sent them yet
        await add_outbox(conn, "ret", 4, age="1 hour", published=True)
    before = removed_total("ret.outbox")

    batches = [n async for n in remove_expired(pool, schema="ret", table="outbox", older_than=timedelta(days=7),
                                               batch_size=1000)]

    assert batches == [1000, 1000, 500]
    async with pool.acquire() as conn:
        assert await counts(conn, "ret") == {"unpublished": 3, "published": 4, "inbox": 0}
    assert removed_total("ret.outbox") - before == 2500
    again = [n async for n in remove_expired(pool, schema="ret", table="outbox", older_than=timedelta(days=7))]
    assert again == []


async def test_dedupe_rows_past_the_window_go_recent_ones_stay(env, pool):
    async with pool.acquire() as conn:
        await add_inbox(conn, "ret", 1200, age="9 days")
        await add_inbox(conn, "ret", 5, age="7 days")  # inside the 8-day default window
        await add_outbox(conn, "ret", 2, age="8 days", published=True)
    before = removed_total("ret.inbox")

    removed = await apply_retention(pool, schema="ret", settings=env)

    assert removed == {"outbox": 2, "inbox": 1200}
    async with pool.acquire() as conn:
        assert await counts(conn, "ret") == {"unpublished": 0, "published": 0, "inbox": 5}
    assert removed_total("ret.inbox") - before == 1200


async def test_a_window_of_zero_keeps_rows_forever(env, pool):
    async with pool.acquire() as conn:
        await add_inbox(conn, "ret", 3, age="400 days")
        await add_outbox(conn, "ret", 3, age="400 days", published=True)
    forever = env.model_copy(update={"outbox_retention_hours": 0, "inbox_retention_hours": 0})
    assert await apply_retention(pool, schema="ret", settings=forever) == {}
    async with pool.acquire() as conn:
        assert await counts(conn, "ret") == {"unpublished": 0, "published": 3, "inbox": 3}


def _app(name: str, settings):
    if name == "intake":
        from services.intake.app import create_app

        return create_app(settings, run_relay=False, run_consumer=False)
    if name == "referral":
        from services.referral.app import create_app

        return create_app(settings)
    from services.notifications.app import create_app

    return create_app(settings)


@pytest.mark.parametrize("service", ["intake", "referral", "notifications"])
async def test_each_service_that_owns_an_outbox_runs_retention(env, service):
    settings = env.model_copy(update={"outbox_retention_hours": 1.0, "inbox_retention_hours": 2.0,
                                      "retention_interval_s": 0.1})
    async with running(_app(service, settings)):
        conn = await asyncpg.connect(settings.require_database())
        try:
            await add_outbox(conn, service, 7, age="90 minutes", published=True)
            await add_outbox(conn, service, 2, age="30 minutes", published=True)
            await add_inbox(conn, service, 5, age="3 hours")
            await add_inbox(conn, service, 1, age="90 minutes")

            async def done() -> bool:
                return await counts(conn, service) == {"unpublished": 0, "published": 2, "inbox": 1}

            await wait_until(done, timeout_s=30, what=f"{service} retention to remove the expired rows")
        finally:
            await conn.close()
