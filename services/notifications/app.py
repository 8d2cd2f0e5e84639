"""Composition root of the notifications service: `create_app(settings) -> FastAPI`.

The lifespan starts, in one process: the pool and migrations (+ the development seed of the
officer directory when it is empty), the outbox relay, the faust worker on
clms.referral-events, the delivery loop, the re-alert loop and the LISTEN feed of the SSE hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.notifications import service, views
from services.notifications.channels import EmailSender, SmsWebhookSender
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


def create_app(settings: Settings) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    registry = CollectorRegistry()
    deliveries = Counter("clms_notifications_deliveries", "Delivery outcomes by channel",
                         ["outcome", "channel"], registry=registry)
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
        sms = SmsWebhookSender(settings)
        email = EmailSender(settings)
        st.delivery = service.DeliveryLoop(
            pool=st.pool, settings=settings, senders={"email": email, "sms": sms},
            producer=producer, topics=topics, relay=st.relay, metrics=deliveries)

        def fan_out(alerts: list[dict]) -> None:
            for a in alerts:
                st.hub.publish(a)
            alerts_total.inc(len(alerts))
            st.relay.wake()
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
            asyncio.create_task(st.delivery.run(), name="delivery"),
            asyncio.create_task(realert_loop(), name="realert"),
            asyncio.create_task(service.listen_for_alerts(settings, st.pool, st.hub), name="alert-listener"),
        ]
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
            await sms.aclose()
            with contextlib.suppress(Exception):
                await email.aclose()
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
