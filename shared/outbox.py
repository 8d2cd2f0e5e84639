"""Transactional outbox and inbox.

- `append(conn, ...)` writes an event into `<schema>.outbox` inside the caller's transaction,
  next to the state change it describes.
- `OutboxRelay` publishes unpublished rows in `seq` order (one active relay per schema, chosen
  with an advisory lock), waits for the broker's acks, then marks them published. A broker
  outage leaves rows waiting; a crash between send and mark sends them again, and every
  consumer dedupes on the event id.
- `claim(conn, ...)` records an applied event id in `<schema>.inbox` in the consumer's
  transaction; it returns False when the event was applied before.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from shared.events import Envelope
from shared.metrics import PRODUCED
from shared.topics import Topic, Topics
from shared.wakeup import Wakeup

log = logging.getLogger("clms.outbox")


async def append(conn: asyncpg.Connection, *, schema: str, topic: Topic, envelope: Envelope) -> None:
    await conn.execute(
        f"insert into {schema}.outbox(event_id, topic, key, event_type, envelope) "
        "values($1, $2, $3, $4, $5::jsonb)",  # jsonb is passed and read as text (no codec)
        envelope.id, topic.value, envelope.subject, envelope.type, envelope.to_json_bytes().decode(),
    )


async def claim(conn: asyncpg.Connection, *, schema: str, consumer: str, envelope: Envelope) -> bool:
    """Record that `consumer` applied this event; False if it had been applied already."""
    row = await conn.fetchval(
        f"insert into {schema}.inbox(event_id, consumer, event_type) values($1, $2, $3) "
        "on conflict do nothing returning 1",
        envelope.id, consumer, envelope.type,
    )
    return row is not None


def _lock_key(schema: str) -> int:
    return int.from_bytes(hashlib.sha256(f"clms-outbox:{schema}".encode()).digest()[:8], "big", signed=True)


def _headers(row: asyncpg.Record, env: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [
        ("ce_id", str(row["event_id"]).encode()),
        ("ce_type", row["event_type"].encode()),
        ("ce_source", str(env.get("source", "")).encode()),
        ("correlation_id", str(env.get("correlationid", "")).encode()),
        *([("traceparent", str(env["traceparent"]).encode())] if env.get("traceparent") else []),
    ]


class OutboxRelay:
    """Publishes one schema's outbox to Kafka, in order, at least once."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        schema: str,
        producer: AIOKafkaProducer,
        topics: Topics,
        poll_interval_s: float = 0.05,
        batch_size: int = 500,
        on_published: Callable[[int], None] | None = None,
        send_timeout_s: float = 30.0,
    ):
        self.pool = pool
        self.schema = schema
        self.producer = producer
        self.topics = topics
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.on_published = on_published
        self.send_timeout_s = send_timeout_s
        self._wake = Wakeup()
        self.published_total = 0

    def wake(self) -> None:
        """Tell the relay new rows are committed (saves waiting for the next poll)."""
        self._wake.ring()

    async def run(self) -> None:
        """Run forever: hold the schema's relay lock, publish batches, back off on errors."""
        backoff = 0.2
        while True:
            try:
                async with self.pool.acquire() as lock_conn:
                    got = await lock_conn.fetchval("select pg_try_advisory_lock($1)", _lock_key(self.schema))
                    if not got:
                        await asyncio.sleep(1.0)  # another replica is the relay
                        continue
                    try:
                        while True:
                            n = await self.publish_batch()
                            backoff = 0.2
                            if n < self.batch_size:
                                await self._sleep()
                    finally:
                        await lock_conn.execute("select pg_advisory_unlock($1)", _lock_key(self.schema))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - broker or database away: rows wait
                log.warning("outbox relay for %s paused (%s: %s); retrying in %.1fs",
                            self.schema, type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def _sleep(self) -> None:
        await self._wake.wait(self.poll_interval_s)

    async def publish_batch(self) -> int:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"select seq, event_id, topic, key, event_type, envelope from {self.schema}.outbox "
                "where published_at is null order by seq limit $1",
                self.batch_size,
            )
            if not rows:
                return 0
            # bounded: an unreachable broker must not hold the batch (and a pooled connection) forever
            async with asyncio.timeout(self.send_timeout_s):
                await _publish_rows(self.producer, self.topics, rows)
            await conn.execute(
                f"update {self.schema}.outbox set published_at = now() where seq = any($1::bigint[])",
                [r["seq"] for r in rows],
            )
        self.published_total += len(rows)
        for r in rows:
            PRODUCED.labels(self.schema, r["topic"], r["event_type"]).inc()
        if self.on_published:
            self.on_published(len(rows))
        return len(rows)


async def _publish_rows(producer: AIOKafkaProducer, topics: Topics, rows: list[asyncpg.Record]) -> None:
    """Send rows in order (one partition per key keeps per-case order) and wait for every ack."""
    futures = []
    for r in rows:
        raw = r["envelope"].encode()  # jsonb arrives as text: sent as stored, not re-serialised
        futures.append(
            await producer.send(
                topics.name(Topic(r["topic"])), raw, key=r["key"].encode(),
                headers=_headers(r, orjson.loads(raw)),
            )
        )
    await asyncio.gather(*futures)


async def replay(*, pool: asyncpg.Pool, schema: str, producer: AIOKafkaProducer, topics: Topics,
                 batch_size: int = 2000) -> int:
    """Re-publish every outbox row (published or not) in order: used to refill an empty broker."""
    total = 0
    last = 0
    while True:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                f"select seq, event_id, topic, key, event_type, envelope from {schema}.outbox "
                "where seq > $1 order by seq limit $2",
                last, batch_size,
            )
        if not rows:
            return total
        await _publish_rows(producer, topics, rows)
        last = rows[-1]["seq"]
        total += len(rows)


async def backlog(conn: asyncpg.Connection, *, schema: str) -> dict[str, Any]:
    """Unpublished row count and the age in seconds of the oldest one (for metrics)."""
    row = await conn.fetchrow(
        f"select count(*) as n, extract(epoch from now() - min(created_at)) as age "
        f"from {schema}.outbox where published_at is null"
    )
    return {"rows": row["n"], "oldest_age_s": float(row["age"] or 0.0)}

