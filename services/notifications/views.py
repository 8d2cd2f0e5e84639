"""Inbox API: thin routers over `service` (the caller is always the JWT subject)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from sse_starlette.sse import EventSourceResponse

from services.notifications import service
from services.notifications.models import Alert, Inbox
from shared import access
from shared.auth import MISSING_TOKEN, Claims, CurrentClaims, TokenError, Verified, authenticate
from shared.guard import StreamTicket, guard_of

router = APIRouter(prefix="/v1/inbox", tags=["inbox"])


def _state(request: Request) -> Any:
    return request.app.state.notifications


def _own_inbox(claims: Claims) -> None:
    """The inbox is the caller's own (shared/access_policy.yaml, inbox.read)."""
    decision = access.allowed(claims, "inbox.read", access.Resource(owner=claims.sub))
    if not decision:
        raise HTTPException(status.HTTP_403_FORBIDDEN, decision.reason)


@router.get("", response_model=Inbox, summary="The caller's alerts, newest first")
async def inbox(
    request: Request,
    claims: CurrentClaims,
    unacked_only: Annotated[bool, Query(description="Only alerts not acknowledged yet")] = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict:
    _own_inbox(claims)
    return await service.list_inbox(_state(request).pool, recipient=claims.sub, unacked_only=unacked_only,
                                    limit=limit)


@router.post("/{alert_id}/ack", response_model=Alert, summary="Acknowledge one of the caller's alerts")
async def ack(request: Request, claims: CurrentClaims, alert_id: UUID) -> dict:
    _own_inbox(claims)
    st = _state(request)
    alert = await service.ack_alert(st.pool, alert_id=alert_id, recipient=claims.sub)
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"alert_id: no alert {alert_id} in your inbox")
    st.relay.wake()
    return alert


STREAM = "/v1/inbox/stream"


@router.post("/stream/ticket", response_model=StreamTicket,
             summary="A one-time ticket (30 s) to open the caller's inbox stream from a browser")
async def stream_ticket(request: Request, claims: CurrentClaims) -> dict:
    """EventSource cannot send an Authorization header and a token never goes into a URL: POST
    here with the bearer token, then open `GET /v1/inbox/stream?ticket=<ticket>` within the
    ticket's lifetime. The ticket works once, for this stream and this user only."""
    _own_inbox(claims)
    verified = Verified(claims=claims, exp=request.state.token_exp, iat=0)
    ticket, ttl = guard_of(request).tickets.issue(verified, stream=STREAM)
    return {"ticket": ticket, "expires_in": round(ttl, 1), "url": f"{STREAM}?ticket={ticket}"}


async def _stream_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
    ticket: Annotated[str | None, Query(description="One-time ticket from POST /v1/inbox/stream/ticket "
                                                    "(for EventSource, which cannot send headers)")] = None,
) -> Verified:
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return await authenticate(request, credentials.credentials)
    if ticket:
        try:
            return guard_of(request).tickets.redeem(ticket, stream=STREAM)
        except TokenError as exc:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc)) from None
    raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                        f"{MISSING_TOKEN}, or a one-time ticket from POST {STREAM}/ticket as ?ticket=",
                        headers={"WWW-Authenticate": "Bearer"})


@router.get("/stream", summary="Server-sent events: `alert` for each new alert of the caller",
            response_class=EventSourceResponse)
async def stream(request: Request, caller: Annotated[Verified, Depends(_stream_caller)]) -> EventSourceResponse:
    """Ends with an `expired` event when the caller's token expires (open a new stream with a
    fresh token); at most SSE_MAX_PER_USER streams per user (429 beyond)."""
    _own_inbox(caller.claims)
    st = _state(request)
    claims = caller.claims
    release = guard_of(request).open_stream(claims.sub)
    hub: service.AlertHub = st.hub
    queue = hub.subscribe(claims.sub)
    st.metrics_sse.inc()

    closed = []

    def close() -> None:  # from the generator's end, or after the response if it never started
        if not closed:
            closed.append(True)
            hub.unsubscribe(claims.sub, queue)
            st.metrics_sse.dec()
            release()

    async def events():  # noqa: ANN202
        try:
            yield {"event": "ready", "data": orjson.dumps({"recipient": claims.sub}).decode()}
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

    return EventSourceResponse(events(), ping=15, background=BackgroundTask(close))
