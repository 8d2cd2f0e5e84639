"""Inbox API: thin routers over `service` (the caller is always the JWT subject)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from uuid import UUID

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, status
from sse_starlette.sse import EventSourceResponse

from services.notifications import service
from services.notifications.models import Alert, Inbox
from shared import access
from shared.auth import Claims, CurrentClaims

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


@router.get("/stream", summary="Server-sent events: `alert` for each new alert of the caller",
            response_class=EventSourceResponse)
async def stream(request: Request, claims: CurrentClaims) -> EventSourceResponse:
    _own_inbox(claims)
    st = _state(request)
    hub: service.AlertHub = st.hub
    queue = hub.subscribe(claims.sub)
    st.metrics_sse.inc()

    async def events():  # noqa: ANN202
        try:
            yield {"event": "ready", "data": orjson.dumps({"recipient": claims.sub}).decode()}
            while True:
                try:
                    alert = await asyncio.wait_for(queue.get(), 5.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield {"event": "alert", "id": alert["id"], "data": orjson.dumps(alert).decode()}
        finally:
            hub.unsubscribe(claims.sub, queue)
            st.metrics_sse.dec()

    return EventSourceResponse(events(), ping=15)
