"""What every service's HTTP side shares: /healthz, /readyz, /metrics, and error answers that
name the field (422) instead of a 500.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[str | None]]  # returns None when ready, else why not


def ops_router(*, registry: CollectorRegistry, checks: dict[str, ReadinessCheck]) -> APIRouter:
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
                why = f"{type(exc).__name__}: {exc}"
            if why:
                problems[name] = why
        if problems:
            return JSONResponse({"status": "not ready", "checks": problems}, status_code=503)
        return JSONResponse({"status": "ready", "checks": {k: "ok" for k in checks}})

    @router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
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
