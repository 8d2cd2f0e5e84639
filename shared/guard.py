"""What every public API does before a route runs: `harden(app, settings, service=...)`.

- No token in a URL: a query string carrying `token`, `access_token`, `id_token` or `jwt` is
  refused with 400 (URLs end up in logs, browser history and Referer headers). Live streams
  take a short-lived, single-use stream ticket instead (`StreamTickets`).
- Bounded input: a body over its limit (IDENTIFICATION_BODY_LIMIT for `POST /v1/identifications`,
  BODY_LIMIT for every other route) is refused with 413 before it is read: at once when
  Content-Length says so, and as soon as a chunked body passes the limit otherwise.
- Authentication before the body: on a service whose writes all need a bearer token, a write
  (POST/PUT/PATCH/DELETE) without a valid token is answered 401 before a byte of the body is read.
- Rate limits (the `limits` library, sliding window counter, in memory: every replica counts on its own,
  so N replicas allow up to N times the figure): failed logins per client address
  (AUTH_FAILURE_RATE_LIMIT), writes per principal and per address (WRITE_RATE_LIMIT_*); over a
  limit: 429 with Retry-After.
- Production: `/docs`, `/redoc` and `/openapi.json` answer 404.
- Live streams: at most SSE_MAX_PER_USER open streams per user and process (429 beyond).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

import cachetools
import jwt
from fastapi import FastAPI, HTTPException, Request, status
from limits import parse as parse_limit
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import Claims, TokenError, Verified, Verifier, authenticate
from shared.errors import Unauthenticated
from shared.settings import Environment, Settings

TOKEN_PARAMS = frozenset({"token", "access_token", "id_token", "jwt"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOKEN_IN_URL = ("a token in the URL is refused (URLs are logged and kept in browser history): send it in the "
                "Authorization: Bearer header; a live stream (EventSource) takes a one-time ticket from "
                "POST <stream path>/ticket, passed as ?ticket=")


class StreamTicket(BaseModel):
    ticket: str = Field(description="Pass as ?ticket= to the stream within expires_in seconds; works once")
    expires_in: float = Field(description="Seconds left to open the stream with it")
    url: str = Field(description="The stream's path with the ticket")


class RateLimited(HTTPException):
    def __init__(self, detail: str, retry_after: int):
        super().__init__(status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(retry_after)})


class Guard:
    """Rate limiters, stream tickets and stream slots of one service process."""

    def __init__(self, settings: Settings, *, service: str, bearer_writes: bool = True):
        self.settings = settings
        self.service = service
        self.bearer_writes = bearer_writes
        self.production = settings.environment is Environment.production
        # O(1) per hit; the asyncio storage expires keys in a task of the event loop (the threaded
        # storage started a timer thread every 10 ms under load, and each start blocked the event
        # loop until the new thread ran: bench/README.md, Performance)
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._auth_failures = parse_limit(settings.auth_failure_rate_limit)
        self._writes_principal = parse_limit(settings.write_rate_limit_principal)
        self._writes_address = parse_limit(settings.write_rate_limit_address)
        self.tickets = StreamTickets(ttl_s=settings.stream_ticket_ttl_s)
        self._streams: dict[str, int] = {}

    def body_limit(self, method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/v1/identifications":
            return self.settings.identification_body_limit
        return self.settings.body_limit

    async def _retry_after(self, item, *keys: str) -> int:
        reset, _remaining = await self._limiter.get_window_stats(item, self.service, *keys)
        return max(1, math.ceil(reset - time.time()))

    async def check_auth_failures(self, address: str) -> None:
        if not await self._limiter.test(self._auth_failures, self.service, "auth-failure", address):
            raise RateLimited(
                f"too many failed sign-ins from this address ({self.settings.auth_failure_rate_limit}); "
                "wait for Retry-After seconds, then send a valid token",
                await self._retry_after(self._auth_failures, "auth-failure", address))

    async def record_auth_failure(self, address: str) -> None:
        await self._limiter.hit(self._auth_failures, self.service, "auth-failure", address)

    async def check_write(self, *, principal: str, address: str) -> None:
        if not await self._limiter.hit(self._writes_principal, self.service, "write-principal", principal):
            raise RateLimited(
                f"too many writes by {principal} ({self.settings.write_rate_limit_principal}); "
                "retry after Retry-After seconds",
                await self._retry_after(self._writes_principal, "write-principal", principal))
        if not await self._limiter.hit(self._writes_address, self.service, "write-address", address):
            raise RateLimited(
                f"too many writes from this address ({self.settings.write_rate_limit_address}); "
                "retry after Retry-After seconds", await self._retry_after(self._writes_address, "write-address", address))

    @contextlib.contextmanager
    def stream_slot(self, sub: str):
        """Hold one of the user's SSE_MAX_PER_USER stream slots (429 when all are taken). Use
        `open_stream` when the slot must outlive the route handler."""
        release = self.open_stream(sub)
        try:
            yield
        finally:
            release()

    def open_stream(self, sub: str):
        n = self._streams.get(sub, 0)
        if n >= self.settings.sse_max_per_user:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                                f"{sub} already has {n} open live streams (SSE_MAX_PER_USER); close one "
                                "(another tab or window) before opening another", headers={"Retry-After": "5"})
        self._streams[sub] = n + 1
        done = [False]

        def release() -> None:
            if done[0]:
                return
            done[0] = True
            left = self._streams.get(sub, 1) - 1
            if left <= 0:
                self._streams.pop(sub, None)
            else:
                self._streams[sub] = left

        return release


class StreamTickets:
    """One-time tickets for a live stream (EventSource cannot send an Authorization header).

    `POST <stream>/ticket` with the bearer token issues a ticket bound to the user and the
    stream, valid STREAM_TICKET_TTL_S (30 s) and never past the token's own expiry; the stream
    accepts it once. Tickets are signed with a key made at process start, so a ticket is
    redeemed at the replica that issued it (route stream clients with session affinity, or let
    them retry: a refused ticket costs one POST)."""

    def __init__(self, *, ttl_s: float):
        self.ttl_s = ttl_s
        self._key = secrets.token_bytes(32)
        self._used: cachetools.TTLCache = cachetools.TTLCache(maxsize=100_000, ttl=ttl_s + 5)

    def issue(self, verified: Verified, *, stream: str) -> tuple[str, float]:
        now = time.time()
        exp = min(now + self.ttl_s, verified.exp)
        ticket = jwt.encode({"stream": stream, "exp": int(math.floor(exp)), "token_exp": verified.exp,
                             "jti": secrets.token_urlsafe(16), "iat": int(now),
                             "claims": verified.claims.model_dump(mode="json")},
                            self._key, algorithm="HS256")
        return ticket, exp - now

    def redeem(self, ticket: str, *, stream: str) -> Verified:
        try:
            body = jwt.decode(ticket, self._key, algorithms=["HS256"], options={"require": ["exp", "jti"]})
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid stream ticket ({exc}); get a new one with POST {stream}/ticket") from None
        if body.get("stream") != stream:
            raise TokenError(f"this ticket is for {body.get('stream')!r}, not {stream!r}")
        if body["jti"] in self._used:
            raise TokenError(f"this stream ticket was already used; get a new one with POST {stream}/ticket")
        self._used[body["jti"]] = True
        claims = Claims.model_validate(body["claims"])
        return Verified(claims=claims, exp=float(body["token_exp"]), iat=float(body.get("iat", 0)))


def guard_of(request: Request) -> Guard:
    return request.app.state.guard


def issue_stream_ticket(request: Request, claims: Claims, *, stream: str) -> dict:
    """The answer of `POST <stream>/ticket` for an authenticated caller the route has authorised."""
    verified = Verified(claims=claims, exp=request.state.token_exp, iat=0)
    ticket, ttl = guard_of(request).tickets.issue(verified, stream=stream)
    return {"ticket": ticket, "expires_in": round(ttl, 1), "url": f"{stream}?ticket={ticket}"}


async def stream_caller(request: Request, *, bearer: str | None, ticket: str | None, stream: str) -> Verified | None:
    """Who opens a live stream: the bearer token when one is sent, else the one-time ticket
    (redeemed here: 401 naming why when it is refused), else None (no credentials)."""
    if bearer is not None:
        return await authenticate(request, bearer)
    if ticket:
        try:
            return guard_of(request).tickets.redeem(ticket, stream=stream)
        except TokenError as exc:
            raise Unauthenticated(str(exc)) from None
    return None


def stream_remaining_s(exp: float) -> float:
    return exp - time.time()


class GuardMiddleware:
    """Pure ASGI (no buffering: SSE streams pass through untouched)."""

    def __init__(self, app: ASGIApp, *, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard, path, method = self.guard, scope.get("path", ""), scope.get("method", "GET")
        if guard.production and path in DOCS_PATHS:
            await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        if query and any(k.lower() in TOKEN_PARAMS for k, _ in parse_qsl(query, keep_blank_values=True)):
            await JSONResponse({"detail": TOKEN_IN_URL}, status_code=400)(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        limit = guard.body_limit(method, path)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                await JSONResponse({"detail": "Content-Length is not a number"}, status_code=400)(scope, receive, send)
                return
            if too_big:
                await _too_large(limit)(scope, receive, send)
                return
        if guard.bearer_writes and method in WRITES:
            refused = await self._authenticate_first(scope, headers)
            if refused is not None:
                await refused(scope, receive, send)
                return

        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large_text(limit))
            return message

        await self.app(scope, bounded_receive, send)

    async def _authenticate_first(self, scope: Scope, headers: dict) -> JSONResponse | None:
        from shared.auth import MISSING_TOKEN

        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return JSONResponse({"detail": MISSING_TOKEN}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        client = scope.get("client")
        address = client[0] if client else "unknown"
        verifier: Verifier = scope["app"].state.verifier
        try:
            await self.guard.check_auth_failures(address)
            try:
                verified = await verifier.verified(token.strip())
            except TokenError as exc:
                await self.guard.record_auth_failure(address)
                return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await self.guard.check_write(principal=verified.claims.sub, address=address)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return None


def _too_large_text(limit: int) -> str:
    return (f"the request body is larger than this route accepts ({limit // 1024} KiB); send a smaller body "
            "(an identification carries the child's details, not documents)")


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_text(limit)}, status_code=413, headers={"Connection": "close"})


def harden(app: FastAPI, settings: Settings, *, service: str, bearer_writes: bool = True) -> Guard:
    """Install the guard on `app` and give it its token verifier (closed with the app's lifespan).

    `service` names the audience tokens must carry (None for the workspace, which accepts a token
    made for the four APIs it calls). `bearer_writes=False` for an app whose writes are
    authenticated otherwise (the workspace's session cookie)."""
    guard = Guard(settings, service=service or "workspace", bearer_writes=bearer_writes)
    verifier = Verifier(settings, service=service if service != "workspace" else None)
    app.state.guard = guard
    app.state.verifier = verifier
    app.add_middleware(GuardMiddleware, guard=guard)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator:
        try:
            async with inner(a) as state:
                yield state
        finally:
            await verifier.aclose()

    app.router.lifespan_context = lifespan
    return guard
