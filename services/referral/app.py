"""Composition root of the referral service: API + faust worker + outbox relay + deadline scanner,
in one process (`python -m services.referral`).

`create_app` reads as its steps; the lifespan starts, in this order, the pool, the migrations,
the dependencies (`Deps`), the outbox relay (with the deadline scanner and the retention loop),
the worker; the routes and error handlers are set up when the app is made. Shutdown runs the
same steps backwards. No I/O at import or in `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.referral import store
from services.referral.deps import Clock, Deps, utcnow
from services.referral.rules import RuleSet, load_rules
from services.referral.service import SERVICE
from services.referral.views import router
from services.referral.worker import build_worker, deadline_loop
from shared import access
from shared.db import create_pool, migrate_service
from shared.guard import harden
from shared.kafka import DeadLetter, broker_ready, make_producer
from shared.metrics import lag_sampler, outbox_sampler, throttled
from shared.outbox import OutboxRelay, backlog, run_retention
from shared.settings import Settings
from shared.topics import Topics
from shared.web import install_error_handlers, ops_router

log = logging.getLogger("clms.referral")
MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA = store.SCHEMA


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


@dataclass
class Runtime:
    """What the lifespan started, for the readiness checks and the samplers (empty before the
    start and after the stop)."""

    pool: asyncpg.Pool | None = None
    producer: Any = None
    worker: Any = None
    processor: Any = None
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)


def create_app(settings: Settings, *, clock: Clock = utcnow, rules: RuleSet | None = None) -> FastAPI:
    """The one composition root. `clock` (tests) replaces the wall clock for deadlines and
    timestamps; `rules` replaces the rule file. A rule file that does not validate raises
    `RulesError` here, naming the rule and field, before anything starts."""
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    ruleset = rules or load_rules(settings.referral_rules_file)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.rules_version.set(ruleset.version)
    runtime = Runtime()
    app = FastAPI(
        title="CLMS referral service",
        version="1.0",
        description="Routes every identified child to the agencies that must act, with deadlines; "
                    "agencies acknowledge, accept, decline and complete referrals here.",
        lifespan=_lifespan(settings, ruleset, clock, metrics, runtime),
    )
    app.state.settings = settings
    app.state.rules = ruleset
    app.state.metrics = metrics
    app.state.registry = registry
    install_error_handlers(app)
    harden(app, settings, service="referral")
    _add_routes(app, settings, registry, metrics, runtime)
    return app


def _lifespan(settings: Settings, ruleset: RuleSet, clock: Clock, metrics: Metrics,
              runtime: Runtime) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(_forget, runtime)  # last out: the checks read "not started" again
            pool = await _open_pool(settings, runtime, stack)
            await migrate_service(settings, pool, schema=SCHEMA, folder=MIGRATIONS)
            relay = _relay(settings, pool, metrics, runtime)
            deps = _dependencies(pool, ruleset, clock, relay, metrics)
            app.state.deps = deps
            await _start_relay_and_loops(settings, relay, deps, runtime, stack)
            await _start_worker(settings, deps, metrics, runtime, stack)
            log.info("referral service started (rules version %d, %d rules)", ruleset.version,
                     len(ruleset.rules))
            yield

    return lifespan


def _forget(runtime: Runtime) -> None:
    runtime.pool = runtime.producer = runtime.worker = runtime.processor = None
    runtime.tasks = {}


async def _open_pool(settings: Settings, runtime: Runtime, stack: contextlib.AsyncExitStack) -> asyncpg.Pool:
    pool = await service_pool(settings)
    stack.push_async_callback(pool.close)
    runtime.pool = pool
    return pool


def _relay(settings: Settings, pool: asyncpg.Pool, metrics: Metrics, runtime: Runtime) -> OutboxRelay:
    """The outbox relay and its producer (both started by `_start_relay_and_loops`)."""
    runtime.producer = make_producer(settings)
    return OutboxRelay(pool=pool, schema=SCHEMA, producer=runtime.producer, topics=Topics(settings.topic_prefix),
                       poll_interval_s=settings.outbox_poll_interval_s,
                       batch_size=settings.outbox_batch_size, on_published=metrics.published.inc)


def _dependencies(pool: asyncpg.Pool, ruleset: RuleSet, clock: Clock, relay: OutboxRelay,
                  metrics: Metrics) -> Deps:
    return Deps(
        pool=pool, rules=ruleset, clock=clock, wake_relay=relay.wake,
        on_opened=lambda agency, priority: metrics.opened.labels(agency, priority).inc(),
        on_overdue=lambda agency: metrics.overdue.labels(agency).inc(),
        on_action=lambda action: metrics.actions.labels(action).inc(),
    )


async def _start_relay_and_loops(settings: Settings, relay: OutboxRelay, deps: Deps, runtime: Runtime,
                                 stack: contextlib.AsyncExitStack) -> None:
    """The producer, then the relay, the deadline scanner and the retention loop as tasks."""
    stack.push_async_callback(_stop_quietly, runtime.producer.stop)
    await runtime.producer.start()
    tasks = runtime.tasks
    stack.push_async_callback(_cancel, tasks)
    tasks["relay"] = asyncio.create_task(relay.run(), name="referral-outbox-relay")
    tasks["deadlines"] = asyncio.create_task(
        deadline_loop(deps, interval_s=settings.referral_deadline_poll_s), name="referral-deadlines")
    tasks["retention"] = asyncio.create_task(run_retention(deps.pool, schema=SCHEMA, settings=settings),
                                             name="referral-retention")


async def _start_worker(settings: Settings, deps: Deps, metrics: Metrics, runtime: Runtime,
                        stack: contextlib.AsyncExitStack) -> None:
    def on_dead_letter(letter: DeadLetter) -> None:
        metrics.dead_letters.labels(letter.reason).inc()

    worker, runtime.processor = build_worker(settings, deps, on_dead_letter=on_dead_letter)
    runtime.worker = worker
    stack.push_async_callback(_stop_quietly, worker.stop)
    await worker.start()


async def _stop_quietly(stop: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        await stop()


async def _cancel(tasks: dict[str, asyncio.Task]) -> None:
    for task in tasks.values():
        task.cancel()
    for task in tasks.values():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _add_routes(app: FastAPI, settings: Settings, registry: CollectorRegistry, metrics: Metrics,
                runtime: Runtime) -> None:
    """/healthz, /readyz (database, broker, worker and loops), /metrics, and the referral API."""

    async def check_db() -> str | None:
        if runtime.pool is None:
            return "not started"
        async with runtime.pool.acquire() as conn:
            await conn.fetchval("select 1")
            metrics.backlog.set((await backlog(conn, schema=SCHEMA))["rows"])
        return None

    async def sample_open_referrals() -> None:
        if runtime.pool is None:
            return
        async with runtime.pool.acquire() as conn:
            rows = await store.open_and_overdue_by_agency(conn)
        metrics.open_now.clear()
        metrics.overdue_now.clear()
        for r in rows:
            metrics.open_now.labels(r["agency"]).set(r["open"])
            metrics.overdue_now.labels(r["agency"]).set(r["overdue"])

    app.include_router(ops_router(
        registry=registry,
        checks={"database": check_db, "broker": lambda: broker_ready(runtime.producer),
                "worker": lambda: _check_tasks(runtime)},
        samplers=[outbox_sampler(lambda: runtime.pool, SCHEMA), throttled(sample_open_referrals),
                  lag_sampler(settings, [settings.group_id(SERVICE)])],
    ))
    app.include_router(router)


async def _check_tasks(runtime: Runtime) -> str | None:
    for name, task in runtime.tasks.items():
        if task.done():
            return f"{name} stopped"
    if runtime.worker is None or not runtime.worker.started:
        return "worker not started"
    if runtime.processor is not None and runtime.processor.blocked:
        return runtime.processor.blocked
    return None


async def service_pool(settings: Settings) -> asyncpg.Pool:
    return await create_pool(settings)
