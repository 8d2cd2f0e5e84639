"""Composition root of intake: `create_app(settings)` wires the pool, migrations, the outbox relay
and the consumer into the lifespan. No I/O at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.db import create_pool, migrate_service
from shared import access
from shared.kafka import make_producer
from shared.outbox import OutboxRelay, backlog, run_retention
from shared.settings import Settings
from shared.topics import Topics
from shared.metrics import lag_sampler, outbox_sampler
from shared.guard import harden
from shared.web import install_error_handlers, ops_router
from services.intake import service
from services.intake.crypto import DecryptionError
from services.intake.views import router
from services.intake.worker import GROUP, IntakeConsumer

log = logging.getLogger("clms.intake")

MIGRATIONS = Path(__file__).parent / "migrations"
WAKE_EVERY_S = 0.01  # wake the relay at most this often (see wake() below)

DB_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.identifications = Counter("intake_identifications_total", "Identifications by channel and outcome",
                                       ["channel", "outcome"], registry=registry)
        self.published = Counter("intake_outbox_published_total", "Case events the relay published",
                                 registry=registry)
        self.dead_letters = Counter("intake_dead_letters_total", "Inbound messages dead-lettered, by reason",
                                    ["reason"], registry=registry)
        self.backlog = Gauge("intake_outbox_backlog_rows", "Unpublished outbox rows", registry=registry)


async def _run_relay(settings: Settings, pool: asyncpg.Pool, metrics: Metrics, relay_box: dict) -> None:
    """Start a producer (retrying while the broker is away), then run the relay forever."""
    backoff = 0.2
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
        relay = OutboxRelay(pool=pool, schema=service.SCHEMA, producer=producer, topics=Topics(settings.topic_prefix),
                            poll_interval_s=settings.outbox_poll_interval_s, batch_size=settings.outbox_batch_size,
                            on_published=metrics.published.inc)
        relay_box["relay"] = relay
        try:
            await relay.run()
        finally:
            relay_box.pop("relay", None)
            with contextlib.suppress(Exception):
                await producer.stop()


async def _purge_idempotency_keys(settings: Settings, pool: asyncpg.Pool) -> None:
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


async def _stop_tasks(tasks: list[asyncio.Task]) -> None:
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


def create_app(settings: Settings | None = None, *, run_relay: bool = True, run_consumer: bool = True) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    settings = settings or Settings()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        await migrate_service(settings, pool, schema=service.SCHEMA, folder=MIGRATIONS)
        relay_box: dict = {}

        last_wake = [0.0]

        def wake() -> None:
            # Wake the relay after a commit, at most every 10 ms: under load the rows of many
            # commits go out in one batch (one select, one produce, one update) instead of a
            # batch per request; the relay's own poll interval bounds the wait either way.
            relay = relay_box.get("relay")
            now = time.monotonic()
            if relay is not None and now - last_wake[0] >= WAKE_EVERY_S:
                last_wake[0] = now
                relay.wake()

        intake = service.Intake.build(pool=pool, settings=settings, on_commit=wake)
        consumer = IntakeConsumer(intake=intake, settings=settings, metrics=metrics)
        app.state.intake = intake
        app.state.metrics = metrics
        tasks = []
        if run_relay:
            tasks.append(asyncio.create_task(_run_relay(settings, pool, metrics, relay_box), name="intake-relay"))
        if run_consumer:
            tasks.append(asyncio.create_task(consumer.run(), name="intake-consumer"))
        tasks.append(asyncio.create_task(run_retention(pool, schema=service.SCHEMA, settings=settings), name="intake-retention"))
        tasks.append(asyncio.create_task(_purge_idempotency_keys(settings, pool), name="intake-idempotency-purge"))
        state.update(pool=pool, relay_box=relay_box, consumer=consumer, tasks=tasks)
        try:
            yield
        finally:
            await _stop_tasks(tasks)
            await pool.close()

    app = FastAPI(
        title="CLMS intake",
        version="1.0.0",
        description="Identifications of children in labour, cases and their follow-up events. "
                    "Personal data is encrypted per case; only pseudonymous case events are published.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    harden(app, settings, service="intake")

    @app.exception_handler(service.IntakeError)
    async def _intake_error(request: Request, exc: service.IntakeError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "The case database is unavailable at the moment; nothing was recorded. "
                       "Retry in a few seconds (with the same Idempotency-Key)."},
            status_code=503, headers={"Retry-After": "5"})

    for exc_type in DB_UNAVAILABLE:
        app.add_exception_handler(exc_type, _db_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything else: if the database is away right now, that is the likely cause (a closed
        # transport surfaces as odd errors while PostgreSQL shuts down): say 503, retry later.
        pool = state.get("pool")
        try:
            async with asyncio.timeout(1.0):
                async with pool.acquire() as conn:  # type: ignore[union-attr]
                    await conn.fetchval("select 1")
        except Exception:  # noqa: BLE001 - any failure here means the database is away
            return await _db_down(request, exc)
        log.error("unexpected error %s while handling %s %s", type(exc).__name__, request.method,
                  request.url.path, exc_info=exc)
        return JSONResponse({"detail": "Something unexpected went wrong. Retry with the same Idempotency-Key "
                                       "(it is never recorded twice); operators find the error in the intake log."},
                            status_code=500)

    @app.exception_handler(asyncpg.PostgresError)
    async def _postgres(request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        # connection exceptions (08), insufficient resources (53) and operator intervention (57:
        # shutting down, starting up) mean the database is away, not that the request was wrong
        if str(getattr(exc, "sqlstate", "") or "")[:2] in ("08", "53", "57"):
            return await _db_down(request, exc)
        log.error("unexpected database error %s (sqlstate %s)", type(exc).__name__, getattr(exc, "sqlstate", "?"))
        return JSONResponse({"detail": "The case database rejected the request unexpectedly; nothing was "
                                       "recorded. Operators can find the error class in the intake log."},
                            status_code=500)

    @app.exception_handler(DecryptionError)
    async def _decrypt(request: Request, exc: DecryptionError) -> JSONResponse:
        log.error("case data does not decrypt: %s", exc)  # names the key id, never key material
        return JSONResponse({"detail": "This case's personal data cannot be decrypted with the configured "
                                       "master keys; an operator must check ENCRYPTION_MASTER_KEY(S) "
                                       "(`clms keys status` lists the key ids in use)."},
                            status_code=503)

    async def check_db() -> str | None:
        pool = state.get("pool")
        if pool is None:
            return "not started"
        async with pool.acquire(timeout=2) as conn:
            n = await backlog(conn, schema=service.SCHEMA)
        metrics.backlog.set(n["rows"])
        return None

    async def check_relay() -> str | None:
        if not run_relay:
            return None
        return None if state.get("relay_box", {}).get("relay") else "outbox producer not connected to the broker"

    async def check_consumer() -> str | None:
        if not run_consumer:
            return None
        c = state.get("consumer")
        return None if c is not None and c.running else "consumer not connected to the broker"

    app.include_router(ops_router(
        registry=registry, checks={"database": check_db, "relay": check_relay, "consumer": check_consumer},
        samplers=[outbox_sampler(lambda: state.get("pool"), service.SCHEMA),
                  lag_sampler(settings, [settings.group_id(GROUP)])],
    ))
    app.include_router(router)

    def openapi() -> dict:
        """The generated schema, plus the vocabularies validators enforce (municipality slugs,
        activity codes), so clients and fuzzers see the allowed values."""
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
    return app
