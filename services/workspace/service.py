"""The workspace's use cases: calls to the four public APIs with the signed-in user's token.

The workspace owns no case data: every read and every action is the API's, under the user's own
token, so the services' scope rules and audit apply exactly as for an agency's own system.
An API answer other than 2xx becomes an `ApiError` with its status and the API's sentence.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.workspace.deps import Deps

UNAVAILABLE = 503


class ApiError(Exception):
    """A refused or failed call. `status` 503 also stands for 'could not reach the service'."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = errors or []


def _detail(r: httpx.Response) -> tuple[str, list[dict[str, Any]]]:
    try:
        body = r.json()
    except ValueError:
        return (r.text.strip()[:300] or r.reason_phrase), []
    detail = body.get("detail") if isinstance(body, dict) else body
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(detail, dict):  # e.g. the referral API's 409 {"message", "current_status"}
        detail = detail.get("message") or str(detail)
    elif isinstance(detail, list):  # FastAPI's default 422 shape
        errors = errors or [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"),
                             "message": e.get("msg")} for e in detail if isinstance(e, dict)]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return str(detail), list(errors or [])


async def _call(deps: Deps, method: str, service: str, path: str, *, token: str,
                json: Any = None, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> Any:
    try:
        r = await deps.client.request(
            method, deps.url(service, path), json=json,
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
        )
    except httpx.HTTPError as exc:
        raise ApiError(UNAVAILABLE, f"{service} did not answer ({type(exc).__name__})") from None
    if r.status_code >= 500:
        raise ApiError(UNAVAILABLE, f"{service} answered {r.status_code}")
    if r.status_code >= 400:
        detail, errors = _detail(r)
        raise ApiError(r.status_code, detail, errors)
    return r.json()


# --- intake -------------------------------------------------------------------------------------------


async def report_child(deps: Deps, *, token: str, body: dict[str, Any], idempotency_key: str) -> dict:
    """POST /v1/identifications; the same key (a retried form) returns the first case, never a second."""
    return await _call(deps, "POST", "intake", "/v1/identifications", token=token, json=body,
                       headers={"Idempotency-Key": idempotency_key})


async def get_case(deps: Deps, *, token: str, case_id: uuid.UUID) -> dict:
    return await _call(deps, "GET", "intake", f"/v1/cases/{case_id}", token=token)


async def record_case_event(deps: Deps, *, token: str, case_id: uuid.UUID, event: dict) -> dict:
    return await _call(deps, "POST", "intake", f"/v1/cases/{case_id}/events", token=token, json=event)


# --- referral -----------------------------------------------------------------------------------------


async def list_referrals(deps: Deps, *, token: str, case_id: uuid.UUID | None = None,
                         limit: int = 200) -> list[dict]:
    page = await _call(deps, "GET", "referral", "/v1/referrals", token=token,
                       params={"case_id": case_id and str(case_id), "limit": limit})
    return page["items"]


async def get_referral(deps: Deps, *, token: str, referral_id: uuid.UUID) -> dict:
    return await _call(deps, "GET", "referral", f"/v1/referrals/{referral_id}", token=token)


ACTIONS = ("acknowledge", "accept", "decline", "complete")


async def act_on_referral(deps: Deps, *, token: str, referral_id: uuid.UUID, action: str,
                          reason: str | None = None, outcome: str | None = None) -> dict:
    if action not in ACTIONS:
        raise ApiError(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    body: dict[str, Any] = {}
    if action == "decline":
        body["reason"] = reason
    if action == "complete":
        body["outcome"] = outcome
    return await _call(deps, "POST", "referral", f"/v1/referrals/{referral_id}/{action}",
                       token=token, json=body)


# --- notifications ------------------------------------------------------------------------------------


async def inbox(deps: Deps, *, token: str, limit: int = 50) -> dict:
    return await _call(deps, "GET", "notifications", "/v1/inbox", token=token, params={"limit": limit})


async def ack_alert(deps: Deps, *, token: str, alert_id: uuid.UUID) -> dict:
    return await _call(deps, "POST", "notifications", f"/v1/inbox/{alert_id}/ack", token=token)


async def alert_stream(deps: Deps, *, token: str) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of the user's inbox stream (server-sent events), relayed by the
    workspace so the token never reaches the browser. Ends when the upstream stream ends."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    timeout = httpx.Timeout(10.0, read=None)
    async with deps.client.stream("GET", deps.url("notifications", "/v1/inbox/stream"),
                                     headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            raise ApiError(UNAVAILABLE if r.status_code >= 500 else r.status_code,
                           f"notifications stream answered {r.status_code}")
        event, data = "message", []
        async for line in r.aiter_lines():
            if line == "":
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)


# --- analytics ----------------------------------------------------------------------------------------


async def municipality_figures(deps: Deps, *, token: str, municipality: str) -> dict:
    return await _call(deps, "GET", "analytics", f"/v1/counts/municipalities/{municipality}", token=token)
