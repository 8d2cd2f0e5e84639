"""Composition root of the referral service: API + faust worker + outbox relay + deadline scanner,
in one process (`python -m services.referral`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.referral import service
from services.referral.rules import RuleSet, load_rules
from services.referral.views import router
from services.referral.worker import build_worker, deadline_loop
from shared.db import create_pool, migrate_service
from shared import access
from shared.kafka import DeadLetter, make_producer
from shared.outbox import OutboxRelay, backlog, run_retention
from shared.settings import Settings
from shared.topics import Topics
from shared.kafka import broker_ready
from shared.metrics import lag_sampler, outbox_sampler, throttled
from shared.guard import harden
from shared.web import install_error_handlers, ops_router

log = logging.getLogger("clms.referral")
MIGRATIONS = Path(__file__).with_name("migrations")


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.opened = Counter("clms_referrals_opened_total", "Referrals opened", ["agency", "priority"],
                              registry=registry)
        self.overdue = Counter("clms_referrals_overdue_total", "Referrals that passed their deadline "
                               "unanswered (and were escalated)", ["agency"], registry=registry)
        self.actions = Counter("clms_referral_actions_total", "Actions taken on referrals", ["action"],
                               registry=registry)
        self.dead_letters = Counter("clms_referral_dead_letters_total", "Case events dead-lettered",
                                    ["reason"], registry=registry)
        self.published = Counter("clms_referral_outbox_published_total", "Outbox rows published",
                                 registry=registry)
        self.backlog = Gauge("clms_referral_outbox_backlog", "Unpublished outbox rows", registry=registry)
        # Per agency only: a municipality label would give exact small counts of children's
        # referrals per municipality to anyone who can scrape (issue 15, item 3).
        self.open_now = Gauge("clms_referrals_open_now", "Referrals waiting for an answer or completion",
                              ["agency"], registry=registry)
        self.overdue_now = Gauge("clms_referrals_overdue_now", "Open referrals past their deadline",
                                 ["agency"], registry=registry)
        self.rules_version = Gauge("clms_referral_rules_version", "Version of the routing rule file",
                                   registry=registry)


def create_app(settings: Settings, *, clock: service.Clock = service.utcnow,
               rules: RuleSet | None = None) -> FastAPI:
    """The one composition root. `clock` (tests) replaces the wall clock for deadlines and
    timestamps; `rules` replaces the rule file. A rule file that does not validate raises
    `RulesError` here, naming the rule and field, before anything starts."""
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    ruleset = rules or load_rules(settings.referral_rules_file)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.rules_version.set(ruleset.version)
    topics = Topics(settings.topic_prefix)
    state: dict = {}

    async def check_db() -> str | None:
        pool = state.get("pool")
        if pool is None:
            return "not started"
        async with pool.acquire() as conn:
            await conn.fetchval("select 1")
            metrics.backlog.set((await backlog(conn, schema=service.SCHEMA))["rows"])
        return None

    async def sample_open_referrals() -> None:
        pool = state.get("pool")
        if pool is None:
            return
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                f"select agency, count(*) as open, count(*) filter (where overdue) as overdue "
                f"from {service.SCHEMA}.referral where status in ('pending', 'acknowledged', 'accepted') "
                "group by agency")
        metrics.open_now.clear()
        metrics.overdue_now.clear()
        for r in rows:
            metrics.open_now.labels(r["agency"]).set(r["open"])
            metrics.overdue_now.labels(r["agency"]).set(r["overdue"])

    async def check_tasks() -> str | None:
        for name, task in state.get("tasks", {}).items():
            if task.done():
                return f"{name} stopped"
        worker = state.get("worker")
        if worker is None or not worker.started:
            return "worker not started"
        processor = state.get("processor")
        if processor is not None and processor.blocked:
            return processor.blocked
        return None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await service_pool(settings)
        state["pool"] = pool
        producer = make_producer(settings)
        state["producer"] = producer
        worker = None
        tasks: dict[str, asyncio.Task] = {}
        try:
            await migrate_service(settings, pool, schema=service.SCHEMA, folder=MIGRATIONS)
            await producer.start()
            relay = OutboxRelay(pool=pool, schema=service.SCHEMA, producer=producer, topics=topics,
                                poll_interval_s=settings.outbox_poll_interval_s,
                                batch_size=settings.outbox_batch_size, on_published=metrics.published.inc)
            deps = service.Deps(
                pool=pool, rules=ruleset, clock=clock, wake_relay=relay.wake,
                on_opened=lambda agency, priority: metrics.opened.labels(agency, priority).inc(),
                on_overdue=lambda agency: metrics.overdue.labels(agency).inc(),
                on_action=lambda action: metrics.actions.labels(action).inc(),
            )
            app.state.deps = deps

            def on_dead_letter(letter: DeadLetter) -> None:
                metrics.dead_letters.labels(letter.reason).inc()

            tasks["relay"] = asyncio.create_task(relay.run(), name="referral-outbox-relay")
            tasks["deadlines"] = asyncio.create_task(
                deadline_loop(deps, interval_s=settings.referral_deadline_poll_s), name="referral-deadlines")
            tasks["retention"] = asyncio.create_task(run_retention(pool, schema=service.SCHEMA, settings=settings), name="referral-retention")
            state["tasks"] = tasks
            worker, state["processor"] = build_worker(settings, deps, on_dead_letter=on_dead_letter)
            state["worker"] = worker
            await worker.start()
            log.info("referral service started (rules version %d, %d rules)", ruleset.version,
                     len(ruleset.rules))
            yield
        finally:
            if worker is not None:
                with contextlib.suppress(Exception):
                    await worker.stop()
            for task in tasks.values():
                task.cancel()
            for task in tasks.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await producer.stop()
            await pool.close()
            state.clear()

    app = FastAPI(
        title="CLMS referral service",
        version="1.0",
        description="Routes every identified child to the agencies that must act, with deadlines; "
                    "agencies acknowledge, accept, decline and complete referrals here.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.rules = ruleset
    app.state.metrics = metrics
    app.state.registry = registry
    install_error_handlers(app)
    harden(app, settings, service="referral")
    app.include_router(ops_router(
        registry=registry,
        checks={"database": check_db, "broker": lambda: broker_ready(state.get("producer")), "worker": check_tasks},
        samplers=[outbox_sampler(lambda: state.get("pool"), service.SCHEMA),
                  throttled(sample_open_referrals),
                  lag_sampler(settings, [settings.group_id(service.SERVICE)])],
    ))
    app.include_router(router)
    return app


async def service_pool(settings: Settings):
    return await create_pool(settings)
