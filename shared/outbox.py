"""Transactional outbox and inbox.

- `append(conn, ...)` writes an event into `<schema>.outbox` inside the caller's transaction,
  next to the state change it describes.
- `OutboxRelay` publishes unpublished rows in `seq` order (one active relay per schema, chosen
  with an advisory lock), waits for the broker's acks, then marks them published. A broker
  outage leaves rows waiting; a crash between send and mark sends them again, and every
  consumer dedupes on the event id. It does not poll busily: a writer in the same process rings
  `wake()` after its commit, a replica that does not hold the lock passes its ring on to the one
  that does (`NOTIFY` on the lock holder's connection), and with nothing to publish the poll
  interval doubles up to `idle_poll_max_s` (a row written without a ring, by a tool, waits at
  most that long when the system is idle).
- `claim(conn, ...)` records an applied event id in `<schema>.inbox` in the consumer's
  transaction; it returns False when the event was applied before.
- `run_retention(...)`, started by every service that owns an outbox and an inbox, removes
  published outbox rows older than OUTBOX_RETENTION_HOURS and inbox rows older than
  INBOX_RETENTION_HOURS, in batches, then sleeps RETENTION_INTERVAL_S. Unpublished outbox rows
  are never removed. (Why the inbox window must be the longer one: `Settings`, README.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from shared.events import Envelope
from shared.metrics import PRODUCED, RETENTION_REMOVED
from shared.settings import Settings
from shared.topics import Topic, Topics
from shared.wakeup import Wakeup

log = logging.getLogger("clms.outbox")


def row(topic: Topic, envelope: Envelope) -> tuple[Any, str, str, str, str]:
    """The outbox row of `envelope` (event_id, topic, key, event_type, envelope as JSON text):
    what `append` inserts, for a store function writing several in one statement."""
    return envelope.id, topic.value, envelope.subject, envelope.type, envelope.to_json_bytes().decode()


async def append(conn: asyncpg.Connection, *, schema: str, topic: Topic, envelope: Envelope) -> None:
    await conn.execute(
        f"insert into {schema}.outbox(event_id, topic, key, event_type, envelope) "
        "values($1, $2, $3, $4, $5::jsonb)",  # jsonb is passed and read as text (no codec)
        *row(topic, envelope),
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
        idle_poll_max_s: float = 1.0,
    ):
        self.pool = pool
        self.schema = schema
        self.producer = producer
        self.topics = topics
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.on_published = on_published
        self.send_timeout_s = send_timeout_s
        self.idle_poll_max_s = max(idle_poll_max_s, poll_interval_s)
        self._wake = Wakeup()
        self._interval = poll_interval_s
        self._holds_lock = False
        self._passing_on: asyncio.Task | None = None
        self.published_total = 0
        self.failed_attempts = 0  # rounds that ended in an error (broker or database away)

    @property
    def channel(self) -> str:
        return f"clms_outbox_{self.schema}"

    def wake(self) -> None:
        """Tell the relay new rows are committed (saves waiting for the next poll). In a replica
        that is not the relay, the ring is passed on to the one that is (one NOTIFY at a time)."""
        self._wake.ring()
        if self._holds_lock or (self._passing_on is not None and not self._passing_on.done()):
            return
        try:
            self._passing_on = asyncio.get_running_loop().create_task(self._notify_relay())
        except RuntimeError:  # no running loop: the poll picks the rows up
            pass

    async def _notify_relay(self) -> None:
        try:
            async with self.pool.acquire() as conn:
                await conn.execute("select pg_notify($1, '')", self.channel)
        except Exception as exc:  # noqa: BLE001 - the relay's poll picks the rows up anyway
            log.debug("could not notify the %s outbox relay (%s)", self.schema, type(exc).__name__)

    def _on_notify(self, *_: object) -> None:
        self._wake.ring()

    async def run(self) -> None:
        """Run forever: hold the schema's relay lock, publish batches, back off on errors."""
        backoff = 0.2
        while True:
            try:
                async with self.pool.acquire() as lock_conn:
                    released = False
                    try:
                        got = await lock_conn.fetchval("select pg_try_advisory_lock($1)", _lock_key(self.schema))
                        if not got:
                            released = True
                            await asyncio.sleep(1.0)  # another replica is the relay
                            continue
                        await lock_conn.add_listener(self.channel, self._on_notify)
                        self._holds_lock = True
                        try:
                            while True:
                                n = await self.publish_batch()
                                backoff = 0.2
                                if n < self.batch_size:
                                    await self._sleep(found=n > 0)
                        finally:
                            self._holds_lock = False
                            await lock_conn.remove_listener(self.channel, self._on_notify)
                            await lock_conn.execute("select pg_advisory_unlock($1)", _lock_key(self.schema))
                            released = True
                    finally:
                        if not released:
                            # the session may still hold the relay lock: close it rather than
                            # hand it back to the pool (the pools skip asyncpg's reset query:
                            # shared.db.keep_session)
                            lock_conn.terminate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - broker or database away: rows wait
                self.failed_attempts += 1
                log.warning("outbox relay for %s paused (%s: %s); retrying in %.1fs",
                            self.schema, type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def _sleep(self, *, found: bool = True) -> None:
        self._interval = next_poll_interval(self._interval, found=found, base=self.poll_interval_s,
                                            ceiling=self.idle_poll_max_s)
        await self._wake.wait(self._interval)

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


def next_poll_interval(current: float, *, found: bool, base: float, ceiling: float) -> float:
    """The relay's next poll interval: `base` after a poll that found rows, else twice the last
    one, up to `ceiling` (an idle relay polls about once per `ceiling`, not 1/base times a second)."""
    return base if found else min(ceiling, max(base, current * 2))


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



# --- retention -------------------------------------------------------------------------------------

# One statement per batch, each its own transaction. Rows are taken from the start of the table's
# sequence (the oldest first, through its existing index), and `skip locked` lets two replicas
# run retention at once without waiting on each other.
_EXPIRED = {
    "outbox": ("delete from {schema}.outbox where seq in (select seq from {schema}.outbox "
               "where published_at is not null and published_at < now() - $1::interval "
               "order by seq limit $2 for update skip locked)"),
    "inbox": ("delete from {schema}.inbox where applied_seq in (select applied_seq from {schema}.inbox "
              "where applied_at < now() - $1::interval "
              "order by applied_seq limit $2 for update skip locked)"),
}


async def remove_expired(pool: asyncpg.Pool, *, schema: str, table: str, older_than: timedelta,
                         batch_size: int = 1000) -> AsyncIterator[int]:
    """Remove rows of `<schema>.<table>` (outbox: published rows only) older than `older_than`,
    `batch_size` rows per statement until none is left; yield each batch's count."""
    sql = _EXPIRED[table].format(schema=schema)
    label = f"{schema}.{table}"
    while True:
        async with pool.acquire() as conn:
            status = await conn.execute(sql, older_than, batch_size)
        n = int(status.split()[-1])  # "DELETE <n>"
        if n:
            RETENTION_REMOVED.labels(label).inc(n)
            yield n
        if n < batch_size:
            return


async def apply_retention(pool: asyncpg.Pool, *, schema: str, settings: Settings) -> dict[str, int]:
    """One retention round over a schema's outbox and inbox; rows removed per table."""
    windows = {"outbox": settings.outbox_retention_hours, "inbox": settings.inbox_retention_hours}
    removed: dict[str, int] = {}
    for table, hours in windows.items():
        if hours <= 0:
            continue  # 0: kept forever
        removed[table] = 0
        async for n in remove_expired(pool, schema=schema, table=table, older_than=timedelta(hours=hours),
                                      batch_size=settings.retention_batch_size):
            removed[table] += n
    return removed


async def run_retention(pool: asyncpg.Pool, *, schema: str, settings: Settings) -> None:
    """Run forever: a retention round, then RETENTION_INTERVAL_S of sleep. A database that is away
    only delays the next round."""
    while True:
        try:
            removed = await apply_retention(pool, schema=schema, settings=settings)
            if any(removed.values()):
                log.info("retention removed %s from schema %s",
                         ", ".join(f"{n} {t} rows" for t, n in removed.items() if n), schema)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - database away: the next round tries again
            log.warning("retention round for %s failed (%s); next round in %.0fs", schema,
                        type(exc).__name__, settings.retention_interval_s)
        await asyncio.sleep(settings.retention_interval_s)
