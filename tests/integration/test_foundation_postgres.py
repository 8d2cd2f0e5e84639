"""Migrations and the transactional outbox on a real PostgreSQL (and the real broker)."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from shared.db import MigrationChecksumError, create_pool, migrate, migrate_service
from shared.events import parse_envelope
from shared.kafka import make_producer
from shared.outbox import OutboxRelay, append, backlog, claim, replay
from shared.topics import Topic, Topics
from tests import builders
from tests.infra import wait_until
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration


def _write(folder, name, sql):
    (folder / name).write_text(sql)


async def test_migrations_apply_once_and_are_idempotent(env, tmp_path):
    _write(tmp_path, "001_cases.sql", "create table cases(id uuid primary key);")
    _write(tmp_path, "002_more.sql", "alter table cases add column municipality text;")
    conn = await asyncpg.connect(env.database_url)
    try:
        first = await migrate(conn, schema="svc", folder=tmp_path)
        assert first == ["shared:001", "shared:002", "service:001", "service:002"]
        assert await migrate(conn, schema="svc", folder=tmp_path) == []
        cols = {r["column_name"] for r in await conn.fetch(
            "select column_name from information_schema.columns where table_schema='svc' and table_name='cases'")}
        assert cols == {"id", "municipality"}
        tables = {r["table_name"] for r in await conn.fetch(
            "select table_name from information_schema.tables where table_schema='svc'")}
        assert {"outbox", "inbox", "schema_migrations", "cases"} <= tables
        # a new file applies; an edited applied file is refused
        _write(tmp_path, "003_index.sql", "create index on cases(municipality);")
        assert await migrate(conn, schema="svc", folder=tmp_path) == ["service:003"]
        _write(tmp_path, "001_cases.sql", "create table cases(id uuid primary key, x int);")
        with pytest.raises(MigrationChecksumError, match="changed after it was applied"):
            await migrate(conn, schema="svc", folder=tmp_path)
    finally:
        await conn.close()


async def test_concurrent_migrations_do_not_race(env, tmp_path):
    _write(tmp_path, "001_t.sql", "create table t(id int primary key);")

    async def one():
        conn = await asyncpg.connect(env.database_url)
        try:
            return await migrate(conn, schema="race", folder=tmp_path)
        finally:
            await conn.close()

    results = await asyncio.gather(one(), one(), one())
    assert sorted(len(r) for r in results) == [0, 0, 3]


async def test_a_pooled_connection_comes_back_in_one_round_trip_less_and_with_nothing_left_open(env):
    """The pools skip asyncpg's reset query (shared.db.keep_session): a release sends nothing to
    PostgreSQL. What a reset would have cleared cannot leak: a transaction left open is rolled
    back, and `set local` ends with its transaction."""
    pool = await create_pool(env, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            raw = conn._con  # the connection behind the pool's proxy, to read its query count
            before = raw._protocol.queries_count
            await conn.execute("select 1")
        async with pool.acquire() as conn:
            assert conn._con is raw
            # one query, not two: asyncpg's default reset would have been the second
            assert raw._protocol.queries_count == before + 1
            tx = conn.transaction()
            await tx.start()
            await conn.execute("set local application_name = 'left over'")
            await conn.execute("create temporary table leftover(x int) on commit drop")
        async with pool.acquire() as conn:  # released mid-transaction: rolled back, nothing kept
            assert not conn.is_in_transaction()
            assert await conn.fetchval("select current_setting('application_name')") != "left over"
            assert await conn.fetchval("select to_regclass('pg_temp.leftover')") is None
    finally:
        await pool.close()


async def test_a_failed_migration_does_not_leave_its_lock_on_a_pooled_connection(env, tmp_path):
    _write(tmp_path, "001_bad.sql", "create table t(id int primary key); select no_such_function();")
    pool = await create_pool(env, min_size=1, max_size=1)
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrate_service(env, pool, schema="failed_mig", folder=tmp_path)
        _write(tmp_path, "001_bad.sql", "create table t(id int primary key);")
        # the next start (here: the same pool) takes the lock and applies the fixed file
        applied = await asyncio.wait_for(migrate_service(env, pool, schema="failed_mig", folder=tmp_path), 10)
        assert applied == ["service:001"]
    finally:
        await pool.close()


async def test_outbox_relay_publishes_in_order_marks_rows_and_replays(env, tmp_path):
    conn = await asyncpg.connect(env.database_url)
    await migrate(conn, schema="svc", folder=tmp_path)
    await conn.close()
    topics = Topics(env.topic_prefix)
    pool = await create_pool(env)
    cases = [builders.case_identified() for _ in range(5)]
    envelopes = []
    async with pool.acquire() as c:
        for i in range(4):
            for case in cases:
                e = builders.envelope(case if i == 0 else builders.one_of_each()[1].model_copy(
                    update={"case_id": case.case_id}))
                envelopes.append(e)
                async with c.transaction():
                    await append(c, schema="svc", topic=Topic.case_events, envelope=e)
        assert (await backlog(c, schema="svc"))["rows"] == 20

    producer = make_producer(env)
    await producer.start()
    relay = OutboxRelay(pool=pool, schema="svc", producer=producer, topics=topics, poll_interval_s=0.02)
    task = asyncio.create_task(relay.run())
    try:
        async def drained():
            async with pool.acquire() as c:
                return (await backlog(c, schema="svc"))["rows"] == 0
        await wait_until(drained, timeout_s=20, what="the outbox to drain")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    records = await read_all(env, topics.case_events, min_count=20)
    assert len(records) == 20
    for case in cases:
        got = [str(parse_envelope(r.value).id) for r in records if r.key == str(case.case_id).encode()]
        assert got == [str(e.id) for e in envelopes if e.subject == str(case.case_id)]
    # replay republishes the whole log, in order (used to refill an empty embedded broker)
    assert await replay(pool=pool, schema="svc", producer=producer, topics=topics) == 20
    assert len(await read_all(env, topics.case_events, min_count=40)) == 40
    await producer.stop()

    # inbox: an event id is claimed once per consumer
    async with pool.acquire() as c:
        assert await claim(c, schema="svc", consumer="a", envelope=envelopes[0]) is True
        assert await claim(c, schema="svc", consumer="a", envelope=envelopes[0]) is False
        assert await claim(c, schema="svc", consumer="b", envelope=envelopes[0]) is True
    await pool.close()


async def test_outbox_rows_wait_while_the_broker_is_unreachable(env, tmp_path):
    conn = await asyncpg.connect(env.database_url)
    await migrate(conn, schema="svc", folder=tmp_path)
    e = builders.envelope()
    async with conn.transaction():
        await append(conn, schema="svc", topic=Topic.case_events, envelope=e)
    pool = await create_pool(env)
    dead = env.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"})
    producer = make_producer(dead, request_timeout_ms=500)
    relay = OutboxRelay(pool=pool, schema="svc", producer=producer, topics=Topics(env.topic_prefix),
                        send_timeout_s=1.0)
    with pytest.raises(Exception):
        await producer.start()
    with pytest.raises((asyncio.TimeoutError, Exception)):
        await relay.publish_batch()
    assert (await backlog(conn, schema="svc"))["rows"] == 1, "a failed send must leave the row waiting"
    await conn.close()
    await pool.close()
