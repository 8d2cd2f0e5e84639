"""Composition root of the notifications service: `create_app(settings) -> FastAPI`.

The lifespan starts, in one process: the pool and migrations (+ the development seed of the
officer directory when it is empty), the outbox relay, the faust worker on
clms.referral-events, the re-alert loop, the LISTEN feed of the SSE hub and, with
NOTIFY_DELIVERY_IN_PROCESS=true (the default when the service runs alone), the e-mail/SMS
delivery loop (else its own process: `delivery.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.notifications import service, views
from services.notifications.channels import close_senders, open_senders
from services.notifications.delivery import DeliveryLoop
from services.notifications.worker import register
from shared.db import create_pool, migrate_service
from shared import access
from shared.events import Envelope
from shared.kafka import make_producer
from shared.outbox import OutboxRelay, run_retention
from shared.settings import Settings
from shared.streams import make_faust_app
from shared.topics import Topics
from shared.kafka import broker_ready
from shared.metrics import lag_sampler, outbox_sampler
from shared.guard import harden
from shared.web import install_error_handlers, ops_router

log = logging.getLogger("clms.notifications")


def deliveries_counter(registry: CollectorRegistry) -> Counter:
    return Counter("clms_notifications_deliveries", "Delivery outcomes by channel", ["outcome", "channel"],
                   registry=registry)


def create_app(settings: Settings) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    registry = CollectorRegistry()
    deliveries = deliveries_counter(registry)
    alerts_total = Counter("clms_notifications_inbox_alerts", "In-app alerts created", registry=registry)
    sse_clients = Gauge("clms_notifications_sse_clients", "Open inbox streams", registry=registry)
    st = SimpleNamespace(pool=None, relay=None, hub=service.AlertHub(), tasks=[], faust=None,
                         metrics_sse=sse_clients)
    topics = Topics(settings.topic_prefix)

    async def check_db() -> str | None:
        if st.pool is None:
            return "starting"
        async with st.pool.acquire() as conn:
            await conn.fetchval("select 1")
        return None

    async def check_tasks() -> str | None:
        dead = [t.get_name() for t in st.tasks if t.done()]
        if dead:
            return f"stopped: {', '.join(dead)}"
        processor = getattr(st, "processor", None)
        return processor.blocked if processor is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        st.pool = await service_pool(settings)
        await migrate_service(settings, st.pool, schema=service.SCHEMA, folder=service.MIGRATIONS)
        async with st.pool.acquire() as conn:
            await service.seed_development_roster(conn, settings=settings)
        producer = make_producer(settings)
        await producer.start()
        st.producer = producer
        st.relay = OutboxRelay(pool=st.pool, schema=service.SCHEMA, producer=producer, topics=topics,
                               poll_interval_s=settings.outbox_poll_interval_s,
                               batch_size=settings.outbox_batch_size)
        senders = open_senders(settings) if settings.notify_delivery_in_process else {}
        st.delivery = DeliveryLoop(
            pool=st.pool, settings=settings, senders=senders,
            producer=producer, topics=topics, relay=st.relay, metrics=deliveries) if senders else None

        def fan_out(alerts: list[dict]) -> None:
            for a in alerts:
                st.hub.publish(a)
            alerts_total.inc(len(alerts))
            st.relay.wake()
            if st.delivery is not None:
                st.delivery.wake()

        async def handle(envelope: Envelope, *, cause: service.Cause) -> None:
            async with st.pool.acquire() as conn, conn.transaction():
                alerts = await service.record_event(conn, envelope=envelope, settings=settings, cause=cause)
            fan_out(alerts)

        async def handle_many(items: list[tuple[Envelope, service.Cause]]) -> None:
            async with st.pool.acquire() as conn, conn.transaction():
                alerts = await service.record_events(conn, items=items, settings=settings)
            fan_out(alerts)

        async def realert_loop() -> None:
            interval = max(0.1, min(5.0, settings.realert_after_s / 4))
            while True:
                try:
                    fan_out(await service.realert_due(st.pool, settings=settings))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - database away: next round
                    log.warning("re-alert round failed: %s", type(exc).__name__)
                await asyncio.sleep(interval)

        st.faust = make_faust_app(settings, "notifications")
        st.processor = register(st.faust, topics=topics, group=settings.group_id("notifications"),
                                handle=handle, handle_many=handle_many)
        st.tasks = [
            asyncio.create_task(st.relay.run(), name="outbox-relay"),
            asyncio.create_task(run_retention(st.pool, schema=service.SCHEMA, settings=settings), name="retention"),
            asyncio.create_task(realert_loop(), name="realert"),
            asyncio.create_task(service.listen_for_alerts(settings, st.pool, st.hub), name="alert-listener"),
        ]
        if st.delivery is not None:  # else: its own process (services/notifications/delivery.py)
            st.tasks.append(asyncio.create_task(st.delivery.run(), name="delivery"))
        await st.faust.start()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await st.faust.stop()
            for t in st.tasks:
                t.cancel()
            await asyncio.gather(*st.tasks, return_exceptions=True)
            st.tasks = []
            await close_senders(senders)
            with contextlib.suppress(Exception):
                await producer.stop()
            await st.pool.close()

    app = FastAPI(
        title="CLMS notifications",
        version="1",
        description="Alerts officers about referrals (e-mail, SMS webhook, in-app inbox with SSE).",
        lifespan=lifespan,
    )
    app.state.notifications = st
    install_error_handlers(app)
    harden(app, settings, service="notifications")
    app.include_router(ops_router(
        registry=registry,
        checks={"database": check_db, "broker": lambda: broker_ready(getattr(st, "producer", None)),
                "workers": check_tasks},
        samplers=[outbox_sampler(lambda: st.pool, service.SCHEMA),
                  lag_sampler(settings, [settings.group_id("notifications")])],
    ))
    app.include_router(views.router)
    return app


async def service_pool(settings: Settings):  # noqa: ANN201
    # +1 connection for each background loop holding one while it works
    return await create_pool(settings, max_size=max(settings.db_pool_max, 4))


def create_delivery_app(settings: Settings) -> FastAPI:
    """The delivery process: the DeliveryLoop, woken by LISTEN on `PENDING_CHANNEL` (and polling
    every NOTIFY_POLL_INTERVAL_S for retries that fall due), behind /healthz, /readyz, /metrics."""
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
            loop = DeliveryLoop(pool=pool, settings=settings, senders=senders, producer=producer,
                                topics=Topics(settings.topic_prefix), metrics=metrics)

            async def wake(_payload: str) -> None:
                loop.wake()

            tasks = state["tasks"] = [asyncio.create_task(loop.run(), name="delivery"),
                                      asyncio.create_task(service.listen(settings, service.PENDING_CHANNEL, wake),
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
        if not await pool.fetchval("select to_regclass($1) is not null", f"{service.SCHEMA}.notifications"):
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

