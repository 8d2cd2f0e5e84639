"""The outbox relay wakes on a commit in any replica, not on a timer: a replica that does not hold
the relay lock passes its ring on (NOTIFY) to the one that does."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from shared.db import create_pool, migrate
from shared.kafka import make_producer
from shared.outbox import OutboxRelay, append, backlog
from shared.topics import Topic, Topics
from tests import builders
from tests.infra import wait_until

pytestmark = pytest.mark.integration


async def test_a_ring_in_a_replica_without_the_lock_wakes_the_relay_that_holds_it(env, tmp_path):
    conn = await asyncpg.connect(env.database_url)
    await migrate(conn, schema="wake", folder=tmp_path)
    pool = await create_pool(env)
    producer = make_producer(env)
    await producer.start()
    topics = Topics(env.topic_prefix)
    # both poll so rarely that only a ring can publish the row within the test's time
    slow = dict(pool=pool, schema="wake", producer=producer, topics=topics, poll_interval_s=120.0,
                idle_poll_max_s=120.0)
    relay, other_replica = OutboxRelay(**slow), OutboxRelay(**slow)
    polls: list[int] = []
    publish_batch = relay.publish_batch

    async def counted() -> int:
        n = await publish_batch()
        polls.append(n)
        return n

    relay.publish_batch = counted  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: polls == [0], timeout_s=20, what="the relay's first (empty) poll")
        async with conn.transaction():
            await append(conn, schema="wake", topic=Topic.case_events, envelope=builders.envelope())
        other_replica.wake()

        async def published():
            return (await backlog(conn, schema="wake"))["rows"] == 0
        await wait_until(published, timeout_s=15, what="the row written in the other replica to be published")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()
        await pool.close()
        await conn.close()
