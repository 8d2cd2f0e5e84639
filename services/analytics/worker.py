"""The faust worker: one agent over the three event topics, folding each event into the case
state table and adjusting the in-memory aggregate by the case's change of contribution.

Runs in the API process (the app's lifespan starts it). Agent concurrency is 1; the handler
reads and writes the table without awaiting in between, so it is atomic within the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faust
from prometheus_client import Counter, Gauge

from services.analytics.rules import Aggregate, CaseState, apply_event
from services.analytics.tables import declare_tables
from shared import tansu
from shared.events import Envelope
from shared.streams import EnvelopeSchema, StreamProcessor, make_faust_app
from shared.topics import PARTITIONS, Topic, Topics

if TYPE_CHECKING:
    from services.analytics.deps import Deps

log = logging.getLogger("clms.analytics.worker")

SOURCE_TOPICS = (Topic.case_events, Topic.referral_events, Topic.notification_events)


@dataclass
class Worker:
    app: faust.App
    table: faust.Table
    aggregate: Aggregate
    recovered: bool = False
    processor: StreamProcessor | None = None
    on_change: list[Callable[[], None]] = field(default_factory=list)

    def changed(self) -> None:
        for fn in self.on_change:
            fn()


def build_worker(deps: Deps, *, name: str = "analytics") -> Worker:
    settings, aggregate, registry = deps.settings, deps.aggregate, deps.registry
    # On Tansu, one changelog record per batch (shared/tansu.py: faust's table recovery would
    # otherwise stop early and drop the rest of a multi-record batch).
    batch = tansu.changelog_batch_size(settings)
    extra = {"producer_max_batch_size": batch} if batch else {}
    app = make_faust_app(settings, name, store=settings.analytics_store, **extra)
    table = declare_tables(app)
    topics = Topics(settings.topic_prefix)
    worker = Worker(app=app, table=table, aggregate=aggregate)

    applied = Counter("analytics_events_applied_total", "Events folded into the tables",
                      ["type"], registry=registry)
    duplicates = Counter("analytics_events_duplicate_total",
                         "Redelivered events recognised and skipped", registry=registry)
    dead = Counter("analytics_dead_letters_total", "Events dead-lettered", ["reason"], registry=registry)
    cases = Gauge("analytics_cases", "Cases held by this worker", registry=registry)
    cases.set_function(lambda: len(table))

    processor = StreamProcessor(app=app, topics=topics, group=settings.group_id(name),
                                on_dead_letter=lambda letter: dead.labels(letter.reason).inc())
    worker.processor = processor
    source = app.topic(*(topics.name(t) for t in SOURCE_TOPICS), schema=EnvelopeSchema(),
                       partitions=PARTITIONS)

    async def handle(envelope: Envelope) -> None:
        key = envelope.key
        old = CaseState.from_bytes(table.get(key))
        new, was_applied = apply_event(old, envelope)
        if not was_applied:
            duplicates.inc()
            return
        table[key] = new.to_bytes()
        aggregate.replace(old, new)
        applied.labels(envelope.type).inc()
        worker.changed()

    @app.agent(source, concurrency=1, name="analytics-fold")
    async def fold(stream):  # noqa: ANN001 - faust stream
        await processor.run(stream, handle)

    @table.on_recover
    async def _rebuild() -> None:
        # After every recovery (start-up, rebalance) the table holds exactly this worker's
        # active partitions: the aggregate is their sum.
        aggregate.rebuild(CaseState.from_bytes(v) for v in table.values())
        worker.recovered = True
        log.info("analytics aggregate rebuilt from %d cases", len(table))
        worker.changed()

    return worker
