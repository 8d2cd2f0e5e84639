"""Composition root of the workspace: `create_app(settings) -> FastAPI`.

One HTTP client (to the four public APIs) opened and closed by the lifespan, which builds the
`Deps` around it; sessions in memory. Nothing does I/O at import or at `create_app` time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.workspace.deps import Deps
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
    """The one composition root, as named steps: the dependencies (`Deps`, built by the lifespan
    around the HTTP client), the error handlers and hardening, the redirect to the sign-in page,
    the security headers, the routes."""
    access.policy()  # shared/access_policy.yaml, validated at start: a bad file stops the service here
    sessions = Sessions()  # the app's, not the lifespan's: kept if the app is started again
    app = FastAPI(title="CLMS workspace", version="1", lifespan=_lifespan(settings, sessions, api_timeout_s),
                  summary="Pages for caseworkers, duty officers and coordinators over the public APIs")
    app.state.settings = settings
    install_error_handlers(app)
    # app.state.verifier checks OIDC access tokens as the services do (any of their audiences);
    # writes here are authenticated by the session cookie, not a bearer token
    harden(app, settings, service="workspace", bearer_writes=False)
    _redirect_to_sign_in(app)
    app.add_middleware(SecurityHeaders)
    _add_routes(app)
    return app


def _lifespan(settings: Settings, sessions: Sessions,
              api_timeout_s: float) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # every open inbox holds one relayed stream: room for many beside the page requests
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=api_timeout_s, limits=limits) as client:
            app.state.deps = Deps(settings=settings, sessions=sessions, client=client,
                                  verifier=app.state.verifier)
            yield

    return lifespan


def _redirect_to_sign_in(app: FastAPI) -> None:
    """A page that needs a signed-in session answers 303 to /signin?next=<the page> without one."""

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        return finish(request, RedirectResponse(f"/signin?next={quote(exc.next_path)}", status_code=303))


def _add_routes(app: FastAPI) -> None:
    """/healthz, /readyz (the HTTP client is open), /metrics, the pages and the static files."""

    async def upstream_client() -> str | None:
        return None if getattr(app.state, "deps", None) is not None else "HTTP client not started"

    app.include_router(ops_router(registry=CollectorRegistry(), checks={"client": upstream_client}))
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
