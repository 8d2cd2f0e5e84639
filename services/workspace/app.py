"""Composition root of the workspace: `create_app(settings) -> FastAPI`.

One HTTP client (to the four public APIs) opened and closed by the lifespan; sessions in memory.
Nothing does I/O at import or at `create_app` time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.workspace import service
from services.workspace.sessions import Sessions
from services.workspace.views import STATIC_DIR, SignInRequired, finish, router
from shared import access
from shared.settings import Settings
from shared.guard import harden
from shared.web import install_error_handlers, ops_router

# Pages load scripts and styles from this site only; no inline script, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class SecurityHeaders:
    """Pure ASGI (no buffering: the inbox stream passes through untouched)."""

    HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()),
                                      *((k, v) for k, v in self.HEADERS if k not in have)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings, *, api_timeout_s: float = 10.0) -> FastAPI:
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    registry = CollectorRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # every open inbox holds one relayed stream: room for many beside the page requests
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=api_timeout_s, limits=limits) as client:
            app.state.backend = service.Backend(settings=settings, client=client)
            yield

    app = FastAPI(title="CLMS workspace", version="1", lifespan=lifespan,
                  summary="Pages for caseworkers, duty officers and coordinators over the public APIs")
    app.state.settings = settings
    app.state.sessions = Sessions()
    install_error_handlers(app)
    # app.state.verifier checks OIDC access tokens as the services do (any of their audiences);
    # writes here are authenticated by the session cookie, not a bearer token
    harden(app, settings, service="workspace", bearer_writes=False)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        return finish(request, RedirectResponse(f"/signin?next={quote(exc.next_path)}", status_code=303))

    app.add_middleware(SecurityHeaders)

    async def upstream_client() -> str | None:
        return None if getattr(app.state, "backend", None) is not None else "HTTP client not started"

    app.include_router(ops_router(registry=registry, checks={"client": upstream_client}))
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
