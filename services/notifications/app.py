"""Composition roots of the notifications service.

`create_app(settings)`: the API and, in its lifespan, in this order: the pool, the migrations
(+ the development seed of the officer directory when it is empty), the dependencies (`Deps`),
the outbox relay, the worker (the faust agent on clms.referral-events, the re-alert loop, the
LISTEN feed of the SSE hub and, with NOTIFY_DELIVERY_IN_PROCESS=true, the default when the
service runs alone, the e-mail/SMS delivery loop), then the routes.

`create_delivery_app(settings)`: the delivery process (`python -m services.notifications.delivery`):
the pool, the delivery loop woken by LISTEN, /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.notifications import service, views
from services.notifications.channels import close_senders, open_senders
from services.notifications.delivery import DeliveryLoop
from services.notifications.deps import Deps, Metrics
from services.notifications.store import MIGRATIONS, SCHEMA
from services.notifications.worker import RealertLoop, register_deps
from shared import access
from shared.db import create_pool, migrate_service
from shared.guard import harden
from shared.kafka import broker_ready, make_producer
from shared.metrics import lag_sampler, outbox_sampler
from shared.outbox import OutboxRelay, run_retention
from shared.settings import Settings
from shared.streams import StreamProcessor, make_faust_app
from shared.topics import Topics
from shared.web import install_error_handlers, ops_router

log = logging.getLogger("clms.notifications")


def deliveries_counter(registry: CollectorRegistry) -> Counter:
    return Counter("clms_notifications_deliveries", "Delivery outcomes by channel", ["outcome", "channel"],
                   registry=registry)


@dataclass
class Running:
    """What the lifespan started (`app.state.notifications`): readiness reads it."""

    pool: asyncpg.Pool | None = None
    deps: Deps | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    faust: Any = None
    processor: StreamProcessor | None = None
    senders: dict[str, Any] = field(default_factory=dict)

    @property
    def delivery(self) -> DeliveryLoop | None:
        return self.deps.delivery if self.deps else None


def create_app(settings: Settings) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    registry = CollectorRegistry()
    metrics = Metrics(
        deliveries=deliveries_counter(registry),
        alerts=Counter("clms_notifications_inbox_alerts", "In-app alerts created", registry=registry),
        sse_clients=Gauge("clms_notifications_sse_clients", "Open inbox streams", registry=registry))
    run = Running()
    app = FastAPI(
        title="CLMS notifications",
        version="1",
        description="Alerts officers about referrals (e-mail, SMS webhook, in-app inbox with SSE).",
        lifespan=functools.partial(_lifespan, settings=settings, metrics=metrics, run=run),
    )
    app.state.notifications = run
    install_error_handlers(app)
    harden(app, settings, service="notifications")
    add_routes(app, settings, registry, run)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI, *, settings: Settings, metrics: Metrics, run: Running) -> AsyncIterator[None]:
    run.pool = await open_pool(settings)
    try:
        await apply_migrations(settings, run.pool)
        run.deps = app.state.deps = await build_deps(settings, run.pool, metrics, run)
        run.tasks = start_relay(run.deps)
        await start_worker(run.deps, run)
        yield
    finally:
        await stop(run)


async def open_pool(settings: Settings) -> asyncpg.Pool:
    # +1 connection for each background loop holding one while it works
    return await create_pool(settings, max_size=max(settings.db_pool_max, 4))


async def apply_migrations(settings: Settings, pool: asyncpg.Pool) -> None:
    await migrate_service(settings, pool, schema=SCHEMA, folder=MIGRATIONS)
    async with pool.acquire() as conn:
        await service.seed_development_roster(conn, settings=settings)


async def build_deps(settings: Settings, pool: asyncpg.Pool, metrics: Metrics, run: Running) -> Deps:
    """The producer (started), the relay and, when it runs here, the delivery loop (not started)."""
    topics = Topics(settings.topic_prefix)
    producer = make_producer(settings)
    await producer.start()
    relay = OutboxRelay(pool=pool, schema=SCHEMA, producer=producer, topics=topics,
                        poll_interval_s=settings.outbox_poll_interval_s, batch_size=settings.outbox_batch_size)
    delivery = None
    if settings.notify_delivery_in_process:  # else its own process (delivery.py)
        run.senders = open_senders(settings)
        delivery = DeliveryLoop(pool=pool, settings=settings, senders=run.senders, producer=producer,
                                topics=topics, relay=relay, metrics=metrics.deliveries)
    return Deps(pool=pool, settings=settings, topics=topics, producer=producer, relay=relay,
                hub=service.AlertHub(), metrics=metrics, delivery=delivery,
                realerts=RealertLoop(after_s=settings.realert_after_s, cap_s=settings.notify_poll_interval_s))


def start_relay(deps: Deps) -> list[asyncio.Task]:
    return [asyncio.create_task(deps.relay.run(), name="outbox-relay"),
            asyncio.create_task(run_retention(deps.pool, schema=SCHEMA, settings=deps.settings), name="retention")]


async def start_worker(deps: Deps, run: Running) -> None:
    """The agent, and the loops beside it: re-alerts, the SSE feed from other replicas, delivery."""
    run.faust = make_faust_app(deps.settings, "notifications")
    run.processor = register_deps(run.faust, deps)
    run.tasks += [
        asyncio.create_task(deps.realerts.run(deps), name="realert"),
        asyncio.create_task(service.listen_for_alerts(deps.settings, deps.pool, deps.hub), name="alert-listener"),
    ]
    if deps.delivery is not None:
        run.tasks.append(asyncio.create_task(deps.delivery.run(), name="delivery"))
    await run.faust.start()


async def stop(run: Running) -> None:
    if run.faust is not None:
        with contextlib.suppress(Exception):
            await run.faust.stop()
    for t in run.tasks:
        t.cancel()
    await asyncio.gather(*run.tasks, return_exceptions=True)
    run.tasks = []
    await close_senders(run.senders)
    if run.deps is not None:
        with contextlib.suppress(Exception):
            await run.deps.producer.stop()
    if run.pool is not None:
        await run.pool.close()


def add_routes(app: FastAPI, settings: Settings, registry: CollectorRegistry, run: Running) -> None:
    async def check_db() -> str | None:
        if run.pool is None:
            return "starting"
        async with run.pool.acquire() as conn:
            await conn.fetchval("select 1")
        return None

    async def check_tasks() -> str | None:
        dead = [t.get_name() for t in run.tasks if t.done()]
        if dead:
            return f"stopped: {', '.join(dead)}"
        return run.processor.blocked if run.processor is not None else None

    app.include_router(ops_router(
        registry=registry,
        checks={"database": check_db, "broker": lambda: broker_ready(run.deps.producer if run.deps else None),
                "workers": check_tasks},
        samplers=[outbox_sampler(lambda: run.pool, SCHEMA),
                  lag_sampler(settings, [settings.group_id("notifications")])],
    ))
    app.include_router(views.router)


# --- the delivery process --------------------------------------------------------------------------


def create_delivery_app(settings: Settings) -> FastAPI:
    """The delivery process: the DeliveryLoop, woken by LISTEN on `PENDING_CHANNEL` (and when the
    LISTEN is back after a reconnect), else asleep until the earliest retry or lease end falls
    due, behind /healthz, /readyz, /metrics."""
    registry = CollectorRegistry()
    metrics = deliveries_counter(registry)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = state["pool"] = await create_pool(settings, max_size=max(settings.db_pool_max, 4))
        producer = state["producer"] = make_producer(settings)
        senders = open_senders(settings)
        tasks: list[asyncio.Task] = []
        try:
            await producer.start()
            topics = Topics(settings.topic_prefix)
            # Never run here: the API/worker process's relay publishes this process's outbox rows
            # (notification.sent/failed). This one is only rung after each delivery: where
            # `OutboxRelay.wake` passes a ring on to the replica that holds the relay (NOTIFY),
            # the rows go out at once; otherwise at that relay's next poll.
            relay = OutboxRelay(pool=pool, schema=SCHEMA, producer=producer, topics=topics)
            loop = DeliveryLoop(pool=pool, settings=settings, senders=senders, producer=producer,
                                topics=topics, relay=relay, metrics=metrics)

            async def wake(_payload: str) -> None:
                loop.wake()

            tasks = state["tasks"] = [asyncio.create_task(loop.run(), name="delivery"),
                                      asyncio.create_task(service.listen(settings, service.PENDING_CHANNEL, wake,
                                                                         listening=loop.wake),
                                                          name="delivery-wakeup")]
            log.info("notifications delivery started")
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_senders(senders)
            with contextlib.suppress(Exception):
                await producer.stop()
            await pool.close()

    async def check_db() -> str | None:
        pool = state.get("pool")
        if pool is None:
            return "starting"
        if not await pool.fetchval("select to_regclass($1) is not null", f"{SCHEMA}.notifications"):
            return "schema not migrated yet (the notifications API/worker process applies it)"
        return None

    async def check_tasks() -> str | None:
        dead = [t.get_name() for t in state.get("tasks", []) if t.done()]
        return f"stopped: {', '.join(dead)}" if dead else None

    app = FastAPI(title="CLMS notifications delivery", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(ops_router(
        registry=registry,
        checks={"database": check_db, "broker": lambda: broker_ready(state.get("producer")),
                "workers": check_tasks}))
    return app
