"""Stream metrics every service exposes on `/metrics` with the same names, so one Grafana
dashboard covers them all:

- `clms_events_consumed_total{group,topic,type,outcome}` (outcome: applied, dead_lettered, retried)
- `clms_event_processing_seconds{group,topic,type}` (histogram, handler time)
- `clms_events_produced_total{schema,topic,type}` (outbox relays)
- `clms_dead_letters_total{group,topic,reason}`
- `clms_dead_letter_send_failures_total{group}` (a dead letter the broker did not take; retried)
- `clms_stream_blocked{group}` (1 while a partition waits on a dead letter it cannot send)
- `clms_outbox_backlog_rows{schema}`, `clms_outbox_oldest_age_seconds{schema}`
- `clms_consumer_lag{group,topic,partition}` (broker end offset minus the group's committed offset)
- `clms_retention_removed_total{table}` (rows the retention task removed, e.g. table="intake.outbox")

They live in one process-wide registry (`STREAMS`), which `shared.web.ops_router` serves next to
the service's own registry; samplers refresh the gauges when `/metrics` is scraped (throttled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("clms.metrics")

STREAMS = CollectorRegistry(auto_describe=True)

CONSUMED = Counter("clms_events_consumed_total", "Events a consumer handled, by outcome",
                   ["group", "topic", "type", "outcome"], registry=STREAMS)
PROCESSING = Histogram("clms_event_processing_seconds", "Time to handle one event (or one batch, per event)",
                       ["group", "topic", "type"], registry=STREAMS,
                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PRODUCED = Counter("clms_events_produced_total", "Events an outbox relay published",
                   ["schema", "topic", "type"], registry=STREAMS)
DEAD_LETTERS = Counter("clms_dead_letters_total", "Messages sent to clms.dead-letters, by reason",
                       ["group", "topic", "reason"], registry=STREAMS)
DEAD_LETTER_SEND_FAILURES = Counter("clms_dead_letter_send_failures_total",
                                    "Dead-letter sends that failed and are retried (the partition waits)",
                                    ["group"], registry=STREAMS)
STREAM_BLOCKED = Gauge("clms_stream_blocked", "1 while a consumer's partition waits on a dead letter "
                       "it cannot send", ["group"], registry=STREAMS)
OUTBOX_BACKLOG = Gauge("clms_outbox_backlog_rows", "Unpublished outbox rows", ["schema"], registry=STREAMS)
OUTBOX_AGE = Gauge("clms_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row",
                   ["schema"], registry=STREAMS)
LAG = Gauge("clms_consumer_lag", "Messages not yet consumed (end offset - committed offset)",
            ["group", "topic", "partition"], registry=STREAMS)
RETENTION_REMOVED = Counter("clms_retention_removed_total",
                            "Rows removed by retention (published outbox rows and inbox dedupe rows past "
                            "their window), by schema-qualified table", ["table"], registry=STREAMS)

Sampler = Callable[[], Awaitable[None]]


def throttled(sampler: Sampler, *, every_s: float = 5.0, timeout_s: float = 3.0) -> Sampler:
    """Run `sampler` at most every `every_s` and never longer than `timeout_s` (a scrape must not
    hang on a broker or database that is away; the gauges then keep their last values)."""
    last = 0.0
    lock = asyncio.Lock()

    async def run() -> None:
        nonlocal last
        if time.monotonic() - last < every_s or lock.locked():
            return
        async with lock:
            last = time.monotonic()
            try:
                await asyncio.wait_for(sampler(), timeout_s)
            except Exception as exc:  # noqa: BLE001 - metrics must not break a scrape
                log.debug("metrics sampler failed: %s", type(exc).__name__)

    return run


def outbox_sampler(get_pool: Callable[[], object], schema: str) -> Sampler:
    """Backlog rows and the age of the oldest unpublished row of one outbox."""
    from shared.outbox import backlog

    async def sample() -> None:
        pool = get_pool()
        if pool is None:
            return
        async with pool.acquire() as conn:  # type: ignore[attr-defined]
            b = await backlog(conn, schema=schema)
        OUTBOX_BACKLOG.labels(schema).set(b["rows"])
        OUTBOX_AGE.labels(schema).set(b["oldest_age_s"])

    return throttled(sample)


def lag_sampler(settings: object, groups: list[str]) -> Sampler:
    """Consumer lag per partition of this service's consumer groups."""
    from shared.kafka import group_lag

    async def sample() -> None:
        for row in await group_lag(settings, groups):  # type: ignore[arg-type]
            LAG.labels(row.group, row.topic, str(row.partition)).set(row.lag)

    return throttled(sample, timeout_s=8.0)
