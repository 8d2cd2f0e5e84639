"""Composition root of the analytics service: `create_app(settings) -> FastAPI`.

The lifespan builds and starts the faust worker (tables recovered from their changelogs, then
the three event topics consumed) in this process; the API reads the in-memory aggregate the
worker maintains. Nothing here does I/O at import or at `create_app` time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry

from services.analytics.counting import Aggregate
from services.analytics.disclosure import Rules
from services.analytics.service import Live, NotPublishedYet, Publisher
from services.analytics.views import STATIC_DIR, router
from services.analytics.rebuild import declare_changelog
from services.analytics.worker import Worker, build_worker
from shared import access
from shared.settings import Settings
from shared.kafka import broker_ready
from shared.metrics import lag_sampler
from shared.guard import harden
from shared.web import install_error_handlers, ops_router

log = logging.getLogger("clms.analytics")


def create_app(settings: Settings, *, stream_coalesce_s: float = 0.1) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    registry = CollectorRegistry()
    aggregate = Aggregate()
    state: dict[str, Worker] = {}
    publisher = Publisher(rules=Rules(small=settings.analytics_small_count, base=settings.analytics_rounding_base,
                                      breakdown_min=settings.analytics_breakdown_min),
                          every_s=settings.analytics_publish_every_s, lag_s=settings.analytics_publish_lag_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        live = Live()
        app.state.live = live
        publisher.on_publish.append(live.changed)  # exact viewers' streams also show publications
        worker = build_worker(settings, aggregate=aggregate, registry=registry,
                              name=settings.analytics_app_id)
        worker.on_change.append(live.changed)
        state["worker"] = worker
        app.state.worker = worker
        await declare_changelog(settings, settings.analytics_app_id)
        await worker.app.start()
        log.info("analytics worker started")
        publishing = asyncio.create_task(publisher.run(aggregate, ready=lambda: worker.recovered),
                                         name="analytics-publisher")
        try:
            yield
        finally:
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await publishing
            publisher.on_publish.remove(live.changed)
            await worker.app.stop()
            state.pop("worker", None)

    async def worker_ready() -> str | None:
        w = state.get("worker")
        if w is None:
            return "worker not started"
        if not w.recovered:
            return "tables still recovering from their changelog"
        if w.processor is not None and w.processor.blocked:
            return w.processor.blocked
        if publisher.snapshot is None:
            return "first public snapshot not published yet"
        return None

    app = FastAPI(
        title="CLMS analytics",
        version="1",
        summary="Live municipal counts, the CLMS funnel, an SSE stream and a dashboard",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.aggregate = aggregate
    app.state.publisher = publisher
    app.state.stream_coalesce_s = stream_coalesce_s
    app.state.registry = registry
    install_error_handlers(app)
    harden(app, settings, service="analytics")

    @app.exception_handler(NotPublishedYet)
    async def _not_published(request: Request, exc: NotPublishedYet) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
    async def broker() -> str | None:
        w = state.get("worker")
        producer = getattr(getattr(w, "app", None), "producer", None) if w else None
        client = getattr(producer, "_producer", None)  # faust's aiokafka producer
        return await broker_ready(client) if client is not None else None

    app.include_router(ops_router(
        registry=registry, checks={"worker": worker_ready, "broker": broker},
        samplers=[lag_sampler(settings, [settings.group_id(settings.analytics_app_id)])],
    ))
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
