"""What every service's HTTP side shares: /healthz, /readyz, /metrics, and error answers that
name the field (422) instead of a 500.

`/metrics` answers only on the service's monitoring port (`monitoring_app`, started next to the
API by `shared.service.serve` on `Settings.metrics_port_for(name)`); on the public API port it
is 404, so API clients never see exact operational counts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import ServiceError
from shared.logs import bound, new_correlation_id
from shared.metrics import STREAMS, Sampler

log = logging.getLogger("clms.web")

MONITORING = "clms.monitoring"  # ASGI scope key set only by monitoring_app (a client cannot set it)

ReadinessCheck = Callable[[], Awaitable[str | None]]  # returns None when ready, else why not


def ops_router(*, registry: CollectorRegistry, checks: dict[str, ReadinessCheck],
               samplers: list[Sampler] | None = None) -> APIRouter:
    """/healthz (alive), /readyz (every check passes), /metrics (the service's registry and the
    shared stream metrics; `samplers` refresh gauges such as lag and outbox backlog first)."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", summary="Database, broker and workers are ready")
    async def readyz() -> Response:
        problems = {}
        for name, check in checks.items():
            try:
                why = await check()
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                # a reason word only: exception texts can carry hosts, users and paths
                log.warning("readiness check %s failed: %s", name, type(exc).__name__)
                why = "unavailable"
            if why:
                problems[name] = why
        if problems:
            return JSONResponse({"status": "not ready", "checks": problems}, status_code=503)
        return JSONResponse({"status": "ready", "checks": {k: "ok" for k in checks}})

    @router.get("/metrics", summary="Prometheus metrics (monitoring port only)",
                response_class=PlainTextResponse, include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if not request.scope.get(MONITORING):
            raise HTTPException(404, "Not Found")  # the public API port has no metrics
        for sample in samplers or ():
            await sample()
        return Response(generate_latest(registry) + generate_latest(STREAMS), media_type=CONTENT_TYPE_LATEST)

    return router


def monitoring_app(app: ASGIApp) -> ASGIApp:
    """The ASGI app of the monitoring port: `GET /metrics` of `app`, nothing else (404). It has no
    lifespan of its own: the API server runs `app`'s lifespan."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            await app({**scope, MONITORING: True}, receive, send)
            return
        await PlainTextResponse("This is the monitoring port: only GET /metrics is served here.",
                                status_code=404)(scope, receive, send)

    return asgi


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(parts) or "body"


_CORRELATION = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class CorrelationMiddleware:
    """Pure ASGI (no buffering, so SSE streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        given = headers.get(b"x-correlation-id", b"").decode("latin-1")
        cid = given if _CORRELATION.match(given) else new_correlation_id()
        trace = headers.get(b"traceparent", b"").decode("latin-1").strip().lower()
        trace = trace if _TRACEPARENT.match(trace) else None

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-correlation-id", cid.encode())]
            await send(message)

        with bound(correlation_id=cid, traceparent=trace):
            await self.app(scope, receive, send_with_header)


def install_error_handlers(app: FastAPI) -> None:
    """422 answers that name the field, and a correlation id on every request: taken from the
    `X-Correlation-Id` header when it is well-formed, else new; bound to every log line of the
    request (`shared.logs.current_correlation_id()`) and echoed in the response."""

    app.add_middleware(CorrelationMiddleware)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "enum" and "expected" in (err.get("ctx") or {}):
                msg = f"must be one of {err['ctx']['expected']}"
            errors.append({"field": _loc(err), "message": msg, "type": err.get("type")})
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": summary, "errors": errors})

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        # shared.errors: raised by use cases in every service, mapped here once
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail}, headers=exc.headers or None)
