"""How several analytics workers split the partitions and every API still answers for all.

Each worker folds the cases of its partitions (faust consumer group) and keeps one partial
`Aggregate` per partition it owns. It publishes each changed partial (coalesced, at most every
`PUBLISH_EVERY_S`) to a compacted one-partition topic, `<app id>-analytics-partials`, keyed by
the partition number: the last record of a key is that partition's partial. Every analytics
process (worker or API) reads the whole topic from the beginning (`PartialsReader`, no consumer
group) and keeps the sum of the latest partial of each partition in the `Aggregate` the API
reads. Counts are sums over disjoint sets of cases, and the acknowledgement sketches merge by
adding buckets, so the sum is exactly what one worker holding every case would count.

Why last-write-wins per key is safe across a rebalance: only the owner of a partition publishes
it; a worker whose partitions are revoked publishes their pending changes and flushes its
producer before giving them up (faust revokes before the group reassigns), and the new owner
publishes every partition it got as soon as it has recovered them from the changelog. Until
then readers keep the previous owner's last partial, which counts everything folded so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.analytics.rules import Aggregate
from shared.kafka import make_admin, make_consumer
from shared.settings import Settings
from shared.topics import PARTITIONS

log = logging.getLogger("clms.analytics.partials")

PUBLISH_EVERY_S = 0.05  # coalesce a burst of events into one record per partition
# A partial holds only non-zero counters. At full breadth (every municipality, month and
# breakdown value) that is ~1.1 MB of JSON a year and ~11 MB a decade: more than the broker's
# default record limit (1 MB) within a year. Compressed (gzip, COMPRESSION) a decade is ~0.65 MB
# (tests/unit/test_analytics_counting.py); the clients allow more so that the broker's limit is
# the one that applies.
MAX_RECORD_BYTES = 16 * 1024 * 1024
COMPRESSION = "gzip"  # JSON of repeated keys compresses ~17x; gzip needs no extra library
BROKER_RECORD_LIMIT = 1_048_588  # Apache Kafka's default message.max.bytes


def partials_topic(settings: Settings, app_id: str) -> str:
    return f"{settings.group_id(app_id)}-analytics-partials"


def partition_key(partition: int) -> bytes:
    return str(partition).encode()


async def declare_partials_topic(settings: Settings, app_id: str) -> None:
    """Compacted, one partition (a total order of publications), before the worker starts."""
    admin = make_admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(partials_topic(settings, app_id), 1, 1,
                                            topic_configs={"cleanup.policy": "compact"})])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


class PartialsReader:
    """Reads every partition's latest partial and keeps their sum in `combined` (the aggregate
    the API reads); `complete` once every partition has published at least once."""

    def __init__(self, settings: Settings, app_id: str, combined: Aggregate,
                 on_change: Callable[[], None]) -> None:
        self.settings, self.topic = settings, partials_topic(settings, app_id)
        self.combined, self.on_change = combined, on_change
        self.latest: dict[int, Aggregate] = {}

    @property
    def complete(self) -> bool:
        return len(self.latest) == PARTITIONS

    async def run(self) -> None:
        consumer = make_consumer(self.settings, group=None, max_partition_fetch_bytes=MAX_RECORD_BYTES)
        await consumer.start()
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                try:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                except Exception as exc:  # noqa: BLE001 - broker away: keep the last sums, read on
                    log.warning("reading the analytics partials failed (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                records = batch.get(tp, [])
                for r in records:
                    if r.key is not None and r.value is not None:
                        self.latest[int(r.key)] = Aggregate.from_bytes(r.value)
                if records:
                    self.combined.load_sum(self.latest.values())
                    self.on_change()
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def stop(task: asyncio.Task | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
