"""Inbox API: thin routes over `service` (the caller is always the JWT subject); errors are
`shared.errors`, mapped to HTTP once by `shared.web`."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from sse_starlette.sse import EventSourceResponse

from services.notifications import service
from services.notifications.deps import DepsDep
from services.notifications.models import Alert, Inbox
from shared.auth import MISSING_TOKEN, CurrentClaims, Verified
from shared.errors import Unauthenticated
from shared.guard import StreamTicket, guard_of, issue_stream_ticket, stream_caller

router = APIRouter(prefix="/v1/inbox", tags=["inbox"])


@router.get("", response_model=Inbox, summary="The caller's alerts, newest first")
async def inbox(
    deps: DepsDep,
    claims: CurrentClaims,
    unacked_only: Annotated[bool, Query(description="Only alerts not acknowledged yet")] = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict:
    return await service.list_inbox(deps, claims=claims, unacked_only=unacked_only, limit=limit)


@router.post("/{alert_id}/ack", response_model=Alert, summary="Acknowledge one of the caller's alerts")
async def ack(deps: DepsDep, claims: CurrentClaims, alert_id: UUID) -> dict:
    return await service.ack_alert(deps, claims=claims, alert_id=alert_id)


STREAM = "/v1/inbox/stream"


@router.post("/stream/ticket", response_model=StreamTicket,
             summary="A one-time ticket (30 s) to open the caller's inbox stream from a browser")
async def stream_ticket(request: Request, claims: CurrentClaims) -> dict:
    """EventSource cannot send an Authorization header and a token never goes into a URL: POST
    here with the bearer token, then open `GET /v1/inbox/stream?ticket=<ticket>` within the
    ticket's lifetime. The ticket works once, for this stream and this user only."""
    service.require_own_inbox(claims)
    return issue_stream_ticket(request, claims, stream=STREAM)


async def _stream_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
    ticket: Annotated[str | None, Query(description="One-time ticket from POST /v1/inbox/stream/ticket "
                                                    "(for EventSource, which cannot send headers)")] = None,
) -> Verified:
    bearer = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
    verified = await stream_caller(request, bearer=bearer, ticket=ticket, stream=STREAM)
    if verified is not None:
        return verified
    raise Unauthenticated(f"{MISSING_TOKEN}, or a one-time ticket from POST {STREAM}/ticket as ?ticket=",
                          headers={"WWW-Authenticate": "Bearer"})


@router.get("/stream", summary="Server-sent events: `alert` for each new alert of the caller",
            response_class=EventSourceResponse)
async def stream(request: Request, deps: DepsDep,
                 caller: Annotated[Verified, Depends(_stream_caller)]) -> EventSourceResponse:
    """Ends with an `expired` event when the caller's token expires (open a new stream with a
    fresh token); at most SSE_MAX_PER_USER streams per user (429 beyond)."""
    service.require_own_inbox(caller.claims)
    sub = caller.claims.sub
    release = guard_of(request).open_stream(sub)
    queue = deps.hub.subscribe(sub)
    deps.metrics.sse_clients.inc()
    closed = []

    def close() -> None:  # from the generator's end, or after the response if it never started
        if not closed:
            closed.append(True)
            deps.hub.unsubscribe(sub, queue)
            deps.metrics.sse_clients.dec()
            release()

    return EventSourceResponse(_events(request, caller, queue, close), ping=15,
                               background=BackgroundTask(close))


async def _events(request: Request, caller: Verified, queue: asyncio.Queue, close) -> object:  # noqa: ANN001
    """`ready`, then an `alert` for each alert of the caller, until the token expires or the
    client goes away."""
    try:
        yield {"event": "ready", "data": orjson.dumps({"recipient": caller.claims.sub}).decode()}
        while True:
            left = caller.exp - time.time()
            if left <= 0:
                yield {"event": "expired",
                       "data": orjson.dumps({"detail": "your token has expired; open the stream again "
                                                       "with a new token"}).decode()}
                return
            try:
                alert = await asyncio.wait_for(queue.get(), min(5.0, left))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield {"event": "alert", "id": alert["id"], "data": orjson.dumps(alert).decode()}
    finally:
        close()
