"""Thin HTTP layer of the analytics service: parse and check the request, call `service`,
answer JSON, CSV or an SSE stream.

Who sees what: figures within a coordinator's or analyst's scope are exact and live; every other
figure is the published, disclosure-controlled snapshot (`disclosure.py`). Month ranges,
referral counts and time to acknowledge are for exact viewers only (a month range on the
published view would let anyone difference two ranges)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from services.analytics import service
from services.analytics.deps import Deps
from services.analytics.models import Funnel, MunicipalityDetail, MunicipalityList, TimeToAcknowledge
from services.analytics.service import Live, MonthRange, Snapshot, Viewer
from shared import access
from shared.auth import CurrentClaims, OptionalClaims, Verified
from shared.errors import Forbidden, NotFound
from shared.guard import StreamTicket, guard_of, issue_stream_ticket, stream_caller
from shared.reference import municipality_slugs

STATIC_DIR = Path(__file__).parent / "static"
MONTH = r"^\d{4}-(0[1-9]|1[0-2])$"

router = APIRouter(tags=["analytics"])


def _deps(request: Request) -> Deps:
    return request.app.state.deps


DepsDep = Annotated[Deps, Depends(_deps)]


def _snapshot(deps: DepsDep) -> Snapshot | None:
    return deps.publisher.snapshot


def _viewer(request: Request, claims: OptionalClaims) -> Viewer:
    return Viewer(claims)


def _months(
    from_: Annotated[str | None, Query(alias="from", pattern=MONTH,
                                       description="First month, YYYY-MM (inclusive)")] = None,
    to: Annotated[str | None, Query(pattern=MONTH, description="Last month, YYYY-MM (inclusive)")] = None,
) -> MonthRange:
    if from_ and to and from_ > to:
        raise RequestValidationError([{"loc": ("query", "to"), "type": "value_error",
                                       "msg": f"'to' ({to}) is before 'from' ({from_})"}])
    return MonthRange(from_, to)


def _slug(slug: Annotated[str, PathParam(description="Municipality slug, e.g. prizren")]) -> str:
    if slug not in municipality_slugs():
        raise NotFound(f"unknown municipality {slug!r}; use one of the 38 slugs, e.g. 'prizren'")
    return slug


def _municipality_filter(
    municipality: Annotated[str | None, Query(description="Municipality slug; omit for all")] = None,
) -> str | None:
    if municipality is not None and municipality not in municipality_slugs():
        raise RequestValidationError([{"loc": ("query", "municipality"), "type": "value_error",
                                       "msg": f"unknown municipality {municipality!r}"}])
    return municipality


Snap = Annotated[Snapshot | None, Depends(_snapshot)]
ViewerDep = Annotated[Viewer, Depends(_viewer)]
Months = Annotated[MonthRange, Depends(_months)]
Slug = Annotated[str, Depends(_slug)]
MunicipalityFilter = Annotated[str | None, Depends(_municipality_filter)]
Format = Annotated[Literal["json", "csv"], Query(description="json (default) or csv")]


def _csv(text: str, filename: str) -> Response:
    return PlainTextResponse(text, media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# --- counts --------------------------------------------------------------------------------------


@router.get("/v1/counts/municipalities", response_model=MunicipalityList,
            summary="Identifications and funnel stages for all 38 municipalities (zeros included)")
async def list_municipalities(deps: DepsDep, snap: Snap, viewer: ViewerDep, months: Months,
                              format: Format = "json") -> Any:
    service.require_range_allowed(viewer, months, None)
    rows = service.municipality_rows(deps.aggregate, viewer=viewer, months=months, snapshot=snap)
    if format == "csv":
        return _csv(service.municipalities_csv(rows), "municipalities.csv")
    return {"from": months.start, "to": months.end, "as_of": snap.as_of_iso if snap else None,
            "disclosure": service.disclosure_terms(deps.publisher), "municipalities": rows}


@router.get("/v1/counts/municipalities/{slug}", response_model=MunicipalityDetail,
            summary="One municipality: identifications by month and breakdowns, funnel, referrals")
async def get_municipality(slug: Slug, deps: DepsDep, snap: Snap, viewer: ViewerDep, months: Months,
                           format: Format = "json") -> Any:
    service.require_range_allowed(viewer, months, slug)
    detail = service.municipality_detail(deps.aggregate, viewer=viewer, slug=slug, months=months, snapshot=snap)
    if format == "csv":
        return _csv(service.detail_csv(detail), f"municipality-{slug}.csv")
    return detail


@router.get("/v1/funnel", response_model=Funnel, response_model_exclude_none=False,
            summary="The CLMS funnel: identified -> referred -> acknowledged in time -> accepted -> "
                    "completed -> withdrawn -> school enrolled")
async def get_funnel(deps: DepsDep, snap: Snap, viewer: ViewerDep, months: Months, municipality: MunicipalityFilter,
                     format: Format = "json") -> Any:
    service.require_range_allowed(viewer, months, municipality)
    result = service.funnel(deps.aggregate, viewer=viewer, municipality=municipality, months=months, snapshot=snap)
    if format == "csv":
        return _csv(service.funnel_csv(result), f"funnel-{municipality or 'all'}.csv")
    return result


@router.get("/v1/time-to-acknowledge", response_model=TimeToAcknowledge,
            summary="Median and 90th percentile time from referral to acknowledgement, per agency")
async def get_time_to_acknowledge(deps: DepsDep, viewer: ViewerDep, municipality: MunicipalityFilter) -> Any:
    # per agency: which agencies a case reaches follows from the child's age, sector and form of work
    service.require_exact(viewer, municipality, "time to acknowledge")
    return service.time_to_acknowledge(deps.aggregate, municipality=municipality)


# --- CSV exports (same tables, stable file URLs) -------------------------------------------------


@router.get("/v1/export/municipalities.csv", response_class=PlainTextResponse, summary="CSV of /v1/counts/municipalities")
async def export_municipalities(deps: DepsDep, snap: Snap, viewer: ViewerDep, months: Months) -> Response:
    service.require_range_allowed(viewer, months, None)
    return _csv(service.municipalities_csv(service.municipality_rows(deps.aggregate, viewer=viewer, months=months,
                                                                     snapshot=snap)), "municipalities.csv")


@router.get("/v1/export/municipalities/{slug}.csv", response_class=PlainTextResponse,
            summary="CSV of /v1/counts/municipalities/{slug}")
async def export_municipality(slug: Slug, deps: DepsDep, snap: Snap, viewer: ViewerDep, months: Months) -> Response:
    service.require_range_allowed(viewer, months, slug)
    detail = service.municipality_detail(deps.aggregate, viewer=viewer, slug=slug, months=months, snapshot=snap)
    return _csv(service.detail_csv(detail), f"municipality-{slug}.csv")


@router.get("/v1/export/funnel.csv", response_class=PlainTextResponse, summary="CSV of /v1/funnel")
async def export_funnel(deps: DepsDep, snap: Snap, viewer: ViewerDep, months: Months,
                        municipality: MunicipalityFilter) -> Response:
    service.require_range_allowed(viewer, months, municipality)
    result = service.funnel(deps.aggregate, viewer=viewer, municipality=municipality, months=months, snapshot=snap)
    return _csv(service.funnel_csv(result), f"funnel-{municipality or 'all'}.csv")


# --- live stream ---------------------------------------------------------------------------------


STREAM = "/v1/stream"


@router.post("/v1/stream/ticket", response_model=StreamTicket,
             summary="A one-time ticket (30 s) to open the live stream with the caller's exact figures")
async def stream_ticket(request: Request, claims: CurrentClaims) -> dict:
    """EventSource cannot send an Authorization header and a token never goes into a URL: POST
    here with the bearer token, then open `GET /v1/stream?ticket=<ticket>` within the ticket's
    lifetime. The ticket works once, for this stream and this user only."""
    decision = access.allowed(claims, "analytics.stream_ticket", access.Resource(owner=claims.sub))
    if not decision:
        raise Forbidden(decision.reason)
    return issue_stream_ticket(request, claims, stream=STREAM)


async def _stream_viewer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
    ticket: Annotated[str | None, Query(description="One-time ticket from POST /v1/stream/ticket (for "
                                                    "EventSource, which cannot send headers); omit for the public view")] = None,
) -> Verified | None:
    bearer = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
    return await stream_caller(request, bearer=bearer, ticket=ticket, stream=STREAM)


@router.get("/v1/stream", summary="Server-sent events: `counts` with every municipality row and the "
                                  "national funnel: for the public, the published snapshot whenever a "
                                  "new one is published; live within a coordinator's or analyst's scope")
async def stream(request: Request, deps: DepsDep,
                 caller: Annotated[Verified | None, Depends(_stream_viewer)]) -> EventSourceResponse:
    """A signed-in stream ends with an `expired` event when the token expires; at most
    SSE_MAX_PER_USER signed-in streams per user (429 beyond)."""
    viewer = Viewer(caller.claims if caller else None)
    publisher = deps.publisher
    # the public stream wakes only on a publication, never on an event
    live: Live = publisher.live if viewer.is_public else deps.live
    coalesce_s = deps.stream_coalesce_s
    release = guard_of(request).open_stream(caller.claims.sub) if caller else (lambda: None)
    expires = caller.exp if caller else float("inf")

    async def events():
        try:
            last: bytes | None = None
            while True:
                left = expires - time.time()
                if left <= 0:
                    yield {"event": "expired", "data": orjson.dumps(
                        {"detail": "your token has expired; open the stream again with a new ticket"}).decode()}
                    return
                token = live.token()
                if publisher.snapshot is None:  # starting: nothing published yet
                    await Live.wait(publisher.live.token(), min(1.0, left))
                    continue
                payload = orjson.dumps(service.summary(deps.aggregate, viewer=viewer, snapshot=publisher.snapshot))
                if payload != last:
                    last = payload
                    yield {"event": "counts", "data": payload.decode()}
                if await Live.wait(token, min(15.0, max(0.0, expires - time.time()))):
                    await asyncio.sleep(coalesce_s)  # fold a burst of events into one push
        finally:
            release()

    return EventSourceResponse(events(), ping=15, background=BackgroundTask(release))


# --- dashboard -----------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
