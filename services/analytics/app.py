"""Composition root of the analytics service: `create_app(settings) -> FastAPI`, a short list of
named steps in the order every service follows (this one has no pool, migrations or relay):
dependencies (`Deps`), worker (started by the lifespan), routes, error handlers.

The lifespan builds and starts the faust worker (tables recovered from their changelogs, then
the three event topics consumed) in this process, and the publisher of the public snapshot; the
API reads the in-memory aggregate the worker maintains. Nothing here does I/O at import or at
`create_app` time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.analytics.deps import Deps, build_deps
from services.analytics.partials import PartialsReader, declare_partials_topic, stop as stop_task
from services.analytics.rebuild import declare_changelog
from services.analytics.views import STATIC_DIR, router
from services.analytics.worker import build_worker
from shared import access
from shared.guard import harden
from shared.kafka import broker_ready
from shared.metrics import lag_sampler
from shared.settings import Settings
from shared.web import install_error_handlers, ops_router

log = logging.getLogger("clms.analytics")

Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


def create_app(settings: Settings, *, stream_coalesce_s: float = 0.1) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    deps = build_deps(settings, stream_coalesce_s=stream_coalesce_s)
    app = FastAPI(
        title="CLMS analytics",
        version="1",
        summary="Live municipal counts, the CLMS funnel, an SSE stream and a dashboard",
        lifespan=worker_lifespan(deps),
    )
    app.state.deps = deps
    install_error_handlers(app)
    harden(app, settings, service="analytics")
    add_routes(app, deps)
    return app


def worker_lifespan(deps: Deps) -> Lifespan:
    """Start the faust worker and the snapshot publisher with the app; stop both with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings, publisher = deps.settings, deps.publisher
        app_id = settings.analytics_app_id
        publisher.on_publish.append(deps.live.changed)  # exact viewers' streams also show publications
        worker = build_worker(deps, name=app_id)
        deps.running.worker = worker
        reader = deps.running.reader = PartialsReader(settings, app_id, deps.aggregate, on_change=deps.live.changed)
        await declare_changelog(settings, app_id)
        await declare_partials_topic(settings, app_id)
        assert worker.producer is not None
        await worker.producer.start()
        tasks = [asyncio.create_task(reader.run(), name="analytics-partials-reader")]
        await worker.app.start()
        log.info("analytics worker started")
        tasks += [asyncio.create_task(worker.publish_forever(), name="analytics-partials-publisher"),
                  asyncio.create_task(publisher.run(deps.aggregate, ready=lambda: worker.recovered and reader.complete),
                                      name="analytics-publisher")]
        try:
            yield
        finally:
            for task in reversed(tasks):
                await stop_task(task)
            publisher.on_publish.remove(deps.live.changed)
            await worker.app.stop()
            with contextlib.suppress(Exception):
                await worker.producer.stop()
            deps.running.worker = deps.running.reader = None

    return lifespan


def add_routes(app: FastAPI, deps: Deps) -> None:
    """The operations routes (health, readiness, metrics), the API and the dashboard's files."""
    settings = deps.settings
    app.include_router(ops_router(
        registry=deps.registry, checks={"worker": _worker_check(deps), "broker": _broker_check(deps)},
        samplers=[lag_sampler(settings, [settings.group_id(settings.analytics_app_id)])],
    ))
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _worker_check(deps: Deps) -> Callable[[], object]:
    async def worker_ready() -> str | None:
        w = deps.running.worker
        if w is None:
            return "worker not started"
        if not w.recovered:
            return "tables still recovering from their changelog"
        if w.processor is not None and w.processor.blocked:
            return w.processor.blocked
        reader = deps.running.reader
        if reader is None or not reader.complete:
            return "partial counts of every partition not read yet"
        if deps.publisher.snapshot is None:
            return "first public snapshot not published yet"
        return None

    return worker_ready


def _broker_check(deps: Deps) -> Callable[[], object]:
    async def broker() -> str | None:
        w = deps.running.worker
        producer = getattr(getattr(w, "app", None), "producer", None) if w else None
        client = getattr(producer, "_producer", None)  # faust's aiokafka producer
        return await broker_ready(client) if client is not None else None

    return broker
