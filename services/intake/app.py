"""Composition root of intake: `create_app(settings)` is a list of named steps (pool, migrations,
dependencies, relay, worker, routes, error handlers); the lifespan runs the ones that do I/O.
No I/O at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge

from shared import access
from shared.db import DATABASE_UNAVAILABLE, create_pool, migrate_service
from shared.guard import harden
from shared.kafka import make_producer
from shared.metrics import lag_sampler, outbox_sampler
from shared.outbox import OutboxRelay, backlog, run_retention
from shared.settings import Settings
from shared.topics import Topics
from shared.web import install_error_handlers, ops_router
from services.intake import service
from services.intake.crypto import DecryptionError
from services.intake.deps import SCHEMA, Deps
from services.intake.views import router
from services.intake.worker import GROUP, IntakeConsumer

log = logging.getLogger("clms.intake")

MIGRATIONS = Path(__file__).parent / "migrations"
WAKE_EVERY_S = 0.01  # wake the relay at most this often (see Running.wake_relay)

DB_DOWN = ("The case database is unavailable at the moment; nothing was recorded. "
           "Retry in a few seconds (with the same Idempotency-Key).")


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.identifications = Counter("intake_identifications_total", "Identifications by channel and outcome",
                                       ["channel", "outcome"], registry=registry)
        self.published = Counter("intake_outbox_published_total", "Case events the relay published",
                                 registry=registry)
        self.dead_letters = Counter("intake_dead_letters_total", "Inbound messages dead-lettered, by reason",
                                    ["reason"], registry=registry)
        self.backlog = Gauge("intake_outbox_backlog_rows", "Unpublished outbox rows", registry=registry)


@dataclass
class Running:
    """What the lifespan started, for the readiness checks and the error handlers."""

    settings: Settings
    metrics: Metrics
    run_relay: bool
    run_consumer: bool
    pool: asyncpg.Pool | None = None
    relay: OutboxRelay | None = None
    consumer: IntakeConsumer | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    _last_wake: float = 0.0

    def wake_relay(self) -> None:
        """After a commit: wake the relay, at most every WAKE_EVERY_S. Under load the rows of many
        commits go out in one batch (one select, one produce, one update) instead of a batch per
        request; the relay's own poll interval bounds the wait either way."""
        now = time.monotonic()
        if self.relay is not None and now - self._last_wake >= WAKE_EVERY_S:
            self._last_wake = now
            self.relay.wake()


# --- the steps -----------------------------------------------------------------------------------------


async def open_pool(running: Running) -> asyncpg.Pool:
    running.pool = await create_pool(running.settings)
    return running.pool


async def migrate(running: Running, pool: asyncpg.Pool) -> None:
    await migrate_service(running.settings, pool, schema=SCHEMA, folder=MIGRATIONS)


def build_deps(running: Running, pool: asyncpg.Pool) -> Deps:
    return Deps.build(pool=pool, settings=running.settings, on_commit=running.wake_relay)


async def relay_forever(running: Running, pool: asyncpg.Pool) -> None:
    """Start a producer (retrying while the broker is away), then run the relay forever."""
    settings, backoff = running.settings, 0.2
    while True:
        producer = make_producer(settings)
        try:
            await producer.start()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        except Exception as exc:  # noqa: BLE001 - broker away: rows wait in the outbox
            log.warning("outbox producer cannot reach the broker (%s); retrying in %.1fs", type(exc).__name__, backoff)
            with contextlib.suppress(Exception):
                await producer.stop()
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)
            continue
        running.relay = OutboxRelay(pool=pool, schema=SCHEMA, producer=producer, topics=Topics(settings.topic_prefix),
                                    poll_interval_s=settings.outbox_poll_interval_s,
                                    batch_size=settings.outbox_batch_size, on_published=running.metrics.published.inc)
        try:
            await running.relay.run()
        finally:
            running.relay = None
            with contextlib.suppress(Exception):
                await producer.stop()


async def purge_idempotency_keys_forever(settings: Settings, pool: asyncpg.Pool) -> None:
    """Forget Idempotency-Key rows after IDEMPOTENCY_RETENTION_H (default 48 h), in batches."""
    while True:
        try:
            n = await service.purge_idempotency_keys(pool, older_than_s=settings.idempotency_retention_h * 3600,
                                                     batch=settings.idempotency_purge_batch)
            if n:
                log.info("purged %d idempotency rows older than %.0f h", n, settings.idempotency_retention_h)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - database away: try again next round
            log.warning("idempotency purge failed (%s); retrying later", type(exc).__name__)
        await asyncio.sleep(settings.idempotency_purge_every_s)


def start_tasks(running: Running, pool: asyncpg.Pool, deps: Deps) -> None:
    """The relay, the consumer (worker), outbox/inbox retention and the idempotency purge."""
    settings = running.settings
    running.consumer = IntakeConsumer(deps=deps, settings=settings, metrics=running.metrics)
    if running.run_relay:
        running.tasks.append(asyncio.create_task(relay_forever(running, pool), name="intake-relay"))
    if running.run_consumer:
        running.tasks.append(asyncio.create_task(running.consumer.run(), name="intake-consumer"))
    running.tasks.append(asyncio.create_task(run_retention(pool, schema=SCHEMA, settings=settings),
                                             name="intake-retention"))
    running.tasks.append(asyncio.create_task(purge_idempotency_keys_forever(settings, pool),
                                             name="intake-idempotency-purge"))


async def stop_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancel background tasks and wait for them; a task still running after a second is
    cancelled again (a library waiting with Python 3.11's asyncio.wait_for can swallow a
    cancellation; our own loops use shared.wakeup.Wakeup, which cannot)."""
    for t in tasks:
        for attempt in range(30):
            if attempt:
                log.warning("background task %s ignored a cancellation; cancelling again", t.get_name())
            t.cancel()
            done, _pending = await asyncio.wait([t], timeout=1.0)
            if done:
                break
        else:
            log.error("background task %s did not stop", t.get_name())
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.warning("background task %s ended with %r", t.get_name(), t.exception())


def lifespan_of(running: Running):  # noqa: ANN201 - FastAPI's lifespan type
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await open_pool(running)
        await migrate(running, pool)
        deps = build_deps(running, pool)
        app.state.deps = deps
        start_tasks(running, pool, deps)
        try:
            yield
        finally:
            await stop_tasks(running.tasks)
            await pool.close()

    return lifespan


def add_routes(app: FastAPI, running: Running) -> None:
    """The API and the operations routes (/healthz, /readyz with its checks, /metrics)."""
    settings, metrics = running.settings, running.metrics

    async def check_db() -> str | None:
        if running.pool is None:
            return "not started"
        async with running.pool.acquire(timeout=2) as conn:
            n = await backlog(conn, schema=SCHEMA)
        metrics.backlog.set(n["rows"])
        return None

    async def check_relay() -> str | None:
        if not running.run_relay:
            return None
        return None if running.relay is not None else "outbox producer not connected to the broker"

    async def check_consumer() -> str | None:
        if not running.run_consumer:
            return None
        return None if running.consumer is not None and running.consumer.running else "consumer not connected to the broker"

    app.include_router(ops_router(
        registry=metrics.registry, checks={"database": check_db, "relay": check_relay, "consumer": check_consumer},
        samplers=[outbox_sampler(lambda: running.pool, SCHEMA), lag_sampler(settings, [settings.group_id(GROUP)])],
    ))
    app.include_router(router)


# --- error handlers: the database away is a 503, never a 500 ---------------------------------------------


def add_error_handlers(app: FastAPI, running: Running) -> None:
    """shared.errors answers (shared.web), then what only intake needs: the database away (503
    with Retry-After, also when it shows as an unexpected error), a database error (500 without
    its text) and case data that does not decrypt (503 naming the setting to check)."""
    install_error_handlers(app)

    async def db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse({"detail": DB_DOWN}, status_code=503, headers={"Retry-After": "5"})

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything else: if the database is away right now, that is the likely cause (a closed
        # transport surfaces as odd errors while PostgreSQL shuts down): say 503, retry later.
        try:
            async with asyncio.timeout(1.0):
                async with running.pool.acquire() as conn:  # type: ignore[union-attr]
                    await conn.fetchval("select 1")
        except Exception:  # noqa: BLE001 - any failure here means the database is away
            return await db_down(request, exc)
        log.error("unexpected error %s while handling %s %s", type(exc).__name__, request.method,
                  request.url.path, exc_info=exc)
        return JSONResponse({"detail": "Something unexpected went wrong. Retry with the same Idempotency-Key "
                                       "(it is never recorded twice); operators find the error in the intake log."},
                            status_code=500)

    async def postgres(request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        # connection exceptions (08), insufficient resources (53) and operator intervention (57:
        # shutting down, starting up) mean the database is away, not that the request was wrong
        if str(getattr(exc, "sqlstate", "") or "")[:2] in ("08", "53", "57"):
            return await db_down(request, exc)
        log.error("unexpected database error %s (sqlstate %s)", type(exc).__name__, getattr(exc, "sqlstate", "?"))
        return JSONResponse({"detail": "The case database rejected the request unexpectedly; nothing was "
                                       "recorded. Operators can find the error class in the intake log."},
                            status_code=500)

    async def undecryptable(request: Request, exc: DecryptionError) -> JSONResponse:
        log.error("case data does not decrypt: %s", exc)  # names the key id, never key material
        return JSONResponse({"detail": "This case's personal data cannot be decrypted with the configured "
                                       "master keys; an operator must check ENCRYPTION_MASTER_KEY(S) "
                                       "(`clms keys status` lists the key ids in use)."},
                            status_code=503)

    for exc_type in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_type, db_down)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(asyncpg.PostgresError, postgres)  # type: ignore[arg-type]
    app.add_exception_handler(DecryptionError, undecryptable)  # type: ignore[arg-type]


def add_openapi_vocabularies(app: FastAPI) -> None:
    """The generated schema, plus the vocabularies validators enforce (municipality slugs,
    activity codes), so clients and fuzzers see the allowed values."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            from shared.reference import municipality_slugs
            from services.intake.rules import activities

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.get("components", {}).get("schemas", {})
            codes = sorted({code for group in activities().values() for code in group})
            for name, model in schemas.items():
                props = model.get("properties", {})
                if name.startswith("IdentificationRequest") and "municipality" in props:
                    props["municipality"]["enum"] = sorted(municipality_slugs())
                if name.startswith("WorkIn") and "activity" in props:
                    props["activity"]["enum"] = codes  # and it must belong to the sector (422 names them)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- the composition root ------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, run_relay: bool = True, run_consumer: bool = True) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    settings = settings or Settings()
    metrics = Metrics(CollectorRegistry())
    running = Running(settings=settings, metrics=metrics, run_relay=run_relay, run_consumer=run_consumer)
    app = FastAPI(
        title="CLMS intake",
        version="1.0.0",
        description="Identifications of children in labour, cases and their follow-up events. "
                    "Personal data is encrypted per case; only pseudonymous case events are published.",
        lifespan=lifespan_of(running),
    )
    app.state.metrics = metrics
    add_error_handlers(app, running)
    harden(app, settings, service="intake")
    add_routes(app, running)
    add_openapi_vocabularies(app)
    return app
