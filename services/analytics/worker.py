"""The faust worker: one agent over the three event topics, folding each event into the case
state table and adjusting the partial aggregate of the event's partition by the case's change
of contribution; the changed partials are published for every analytics process to sum
(`partials.py`), so several workers can split the partitions.

Runs in the API process (the app's lifespan starts it). Agent concurrency is 1; the handler
reads and writes the table without awaiting in between, so it is atomic within the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from services.analytics.partials import (COMPRESSION, MAX_RECORD_BYTES, PUBLISH_EVERY_S, partition_key,
                                         partials_topic)
from services.analytics.rules import Aggregate, CaseState, apply_event
from services.analytics.tables import declare_tables
from shared import tansu
from shared.events import Envelope
from shared.kafka import make_producer
from shared.streams import EnvelopeSchema, StreamProcessor, make_faust_app
from shared.topics import PARTITIONS, Topic, Topics

if TYPE_CHECKING:
    from services.analytics.deps import Deps

log = logging.getLogger("clms.analytics.worker")

SOURCE_TOPICS = (Topic.case_events, Topic.referral_events, Topic.notification_events)

# The worker's faust producer (its table's changelog) gathers records this long into one produce
# request: a changelog record per event was ~200 requests a second at 100 identifications/s, each
# a loopback write whose TCP delivery the kernel charges to the writer (18 % of the worker's
# samples). No answer waits for the changelog (figures come from memory), and faust flushes the
# producer before it commits offsets, so a crash loses nothing. 5 ms -> 50 ms: the worker's CPU
# 2.87 and 3.08 -> 2.71 and 2.63 ms per identification (bench/README.md).
CHANGELOG_LINGER_S = 0.05


@dataclass
class Worker:
    app: faust.App
    table: faust.Table
    source_topics: frozenset[str]
    recovered: bool = False
    processor: StreamProcessor | None = None
    partials: dict[int, Aggregate] = field(default_factory=dict)  # partition -> its cases' sum
    where: dict[bytes, int] = field(default_factory=dict)  # case key -> partition
    dirty: set[int] = field(default_factory=set)  # partials changed since last published
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    on_change: list[Callable[[], None]] = field(default_factory=list)
    producer: AIOKafkaProducer | None = None  # of the partials (started with the app)
    partials_topic: str = ""

    def changed(self, partition: int) -> None:
        self.dirty.add(partition)
        self.wake.set()
        for fn in self.on_change:
            fn()

    def cases_held(self) -> int:
        """Cases of the partitions this worker counts now."""
        return sum(1 for p in self.where.values() if p in self.partials)

    def active_partitions(self) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic in self.source_topics}

    def recount(self) -> None:
        """After a recovery: forget the cases of partitions this worker no longer owns (faust's
        memory store forgets only the keys it recovered, not those written live), then sum each
        owned partition's cases; every owned partition is published again."""
        active = self.active_partitions()
        for key, p in list(self.where.items()):
            if p not in active:
                del self.where[key]
                self.table.data.pop(key, None)
        self.partials = {p: Aggregate() for p in active}
        for key, raw in self.table.data.items():
            p = self.where.get(key)
            if p is None:
                log.error("case of unknown partition in the analytics table; not counted")
                continue
            self.partials[p].add(CaseState.from_bytes(raw))
        self.dirty = set(active)
        self.wake.set()

    async def publish(self) -> None:
        """Send every changed partial and wait until the broker has them."""
        assert self.producer is not None
        dirty, self.dirty = sorted(self.dirty), set()
        try:
            futures = [await self.producer.send(self.partials_topic, self.partials[p].to_bytes(),
                                                key=partition_key(p)) for p in dirty if p in self.partials]
            await asyncio.gather(*futures)
        except Exception:
            self.dirty.update(dirty)  # sent again (whole, the latest) on the next try
            raise

    async def publish_forever(self) -> None:
        backoff = PUBLISH_EVERY_S
        while True:
            await self.wake.wait()
            self.wake.clear()
            try:
                await self.publish()
                backoff = PUBLISH_EVERY_S
            except Exception as exc:  # noqa: BLE001 - broker away: the partials wait, then go again
                log.warning("publishing the analytics partials failed (%s); retrying in %.1fs",
                            type(exc).__name__, backoff)
                self.wake.set()
                backoff = min(5.0, backoff * 2)
            await asyncio.sleep(backoff)  # coalesce a burst into one record per partition

    async def hand_over(self, revoked: set[int]) -> None:
        """Partitions revoked: publish their last changes, wait until the broker has them, then
        stop counting them (the new owner publishes them after its recovery)."""
        if self.producer is not None:
            try:
                await self.publish()
            except Exception as exc:  # noqa: BLE001 - the new owner publishes them after its recovery
                log.warning("last analytics partials before a rebalance not sent (%s)", type(exc).__name__)
        for p in revoked:
            self.partials.pop(p, None)


def build_worker(deps: Deps, *, name: str = "analytics") -> Worker:
    settings = deps.settings
    # On Tansu, one changelog record per batch (shared/tansu.py: faust's table recovery would
    # otherwise stop early and drop the rest of a multi-record batch). No standby replicas: a
    # standby's records would land in the same memory store; a new owner recovers from the
    # changelog instead.
    batch = tansu.changelog_batch_size(settings)
    extra: dict[str, Any] = {"producer_max_batch_size": batch} if batch else {}
    extra["producer_linger"] = CHANGELOG_LINGER_S
    app = make_faust_app(settings, name, store=settings.analytics_store, table_standby_replicas=0, **extra)
    topics = Topics(settings.topic_prefix)
    worker: Worker

    async def recovered_record(event: Any) -> None:  # every changelog record read in recovery
        if event.message.value is not None:
            worker.where[event.key] = event.message.partition
        else:  # a tombstone: the case is gone from the table
            worker.where.pop(event.key, None)

    table = declare_tables(app, on_changelog_event=recovered_record)
    worker = Worker(app=app, table=table, source_topics=frozenset(topics.name(t) for t in SOURCE_TOPICS),
                    producer=make_producer(settings, linger_ms=5, max_request_size=MAX_RECORD_BYTES,
                                           compression_type=tansu.compression_type(settings, COMPRESSION)),
                    partials_topic=partials_topic(settings, name))
    _fold_agent(worker, deps, topics, name)

    @app.on_partitions_revoked.connect
    async def _revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        await worker.hand_over({tp.partition for tp in revoked if tp.topic in worker.source_topics})

    @table.on_recover
    async def _rebuild() -> None:
        worker.recount()
        worker.recovered = True
        log.info("analytics partials rebuilt from %d cases of partitions %s (table %d keys)",
                 worker.cases_held(), sorted(worker.partials), len(table.data))
        for fn in worker.on_change:
            fn()

    return worker


def _fold_agent(worker: Worker, deps: Deps, topics: Topics, name: str) -> None:
    app, table, registry = worker.app, worker.table, deps.registry
    applied = Counter("analytics_events_applied_total", "Events folded into the tables",
                      ["type"], registry=registry)
    duplicates = Counter("analytics_events_duplicate_total",
                         "Redelivered events recognised and skipped", registry=registry)
    dead = Counter("analytics_dead_letters_total", "Events dead-lettered", ["reason"], registry=registry)
    cases = Gauge("analytics_cases", "Cases held by this worker", registry=registry)
    cases.set_function(worker.cases_held)

    processor = StreamProcessor(app=app, topics=topics, group=deps.settings.group_id(name),
                                on_dead_letter=lambda letter: dead.labels(letter.reason).inc())
    worker.processor = processor
    source = app.topic(*(topics.name(t) for t in SOURCE_TOPICS), schema=EnvelopeSchema(),
                       partitions=PARTITIONS)

    async def handle(envelope: Envelope) -> None:
        key = envelope.key
        partition = faust.current_event().message.partition
        old = CaseState.from_bytes(table.get(key))
        new, was_applied = apply_event(old, envelope)
        if not was_applied:
            duplicates.inc()
            return
        table[key] = new.to_bytes()
        worker.where[key] = partition
        applied.labels(envelope.type).inc()
        part = worker.partials.get(partition)
        if part is not None:  # else revoked while this event was in flight: its new owner counts it
            part.replace(old, new)
            worker.changed(partition)

    @app.agent(source, concurrency=1, name="analytics-fold")
    async def fold(stream):  # noqa: ANN001 - faust stream
        await processor.run(stream, handle)
