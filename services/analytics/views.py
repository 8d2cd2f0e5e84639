"""Thin HTTP layer of the analytics service: parse and check the request, call `service`,
answer JSON, CSV or an SSE stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse

from services.analytics import service
from services.analytics.counting import SUPPRESS_BELOW, Aggregate
from services.analytics.models import Funnel, MunicipalityDetail, MunicipalityList, TimeToAcknowledge
from services.analytics.service import Live, MonthRange, Viewer
from shared.auth import OptionalClaims, TokenError
from shared.reference import municipality_slugs

STATIC_DIR = Path(__file__).parent / "static"
MONTH = r"^\d{4}-(0[1-9]|1[0-2])$"

router = APIRouter(tags=["analytics"])


def _aggregate(request: Request) -> Aggregate:
    return request.app.state.aggregate


def _live(request: Request) -> Live:
    return request.app.state.live


def _viewer(request: Request, claims: OptionalClaims,
            access_token: Annotated[str | None, Query(
                description="Token for clients that cannot send headers (EventSource); "
                            "same JWT as the Authorization header")] = None) -> Viewer:
    if claims is None and access_token:
        try:
            claims = request.app.state.verifier.verify(access_token)
        except TokenError as exc:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc)) from None
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
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"unknown municipality {slug!r}; use one of the 38 slugs, e.g. 'prizren'")
    return slug


def _municipality_filter(
    municipality: Annotated[str | None, Query(description="Municipality slug; omit for all")] = None,
) -> str | None:
    if municipality is not None and municipality not in municipality_slugs():
        raise RequestValidationError([{"loc": ("query", "municipality"), "type": "value_error",
                                       "msg": f"unknown municipality {municipality!r}"}])
    return municipality


Agg = Annotated[Aggregate, Depends(_aggregate)]
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
async def list_municipalities(agg: Agg, viewer: ViewerDep, months: Months, format: Format = "json") -> Any:
    rows = service.municipality_rows(agg, viewer=viewer, months=months)
    if format == "csv":
        return _csv(service.municipalities_csv(rows), "municipalities.csv")
    return {"from": months.start, "to": months.end, "suppressed_below": SUPPRESS_BELOW, "municipalities": rows}


@router.get("/v1/counts/municipalities/{slug}", response_model=MunicipalityDetail,
            summary="One municipality: identifications by month and breakdowns, funnel, referrals")
async def get_municipality(slug: Slug, agg: Agg, viewer: ViewerDep, months: Months,
                           format: Format = "json") -> Any:
    detail = service.municipality_detail(agg, viewer=viewer, slug=slug, months=months)
    if format == "csv":
        return _csv(service.detail_csv(detail), f"municipality-{slug}.csv")
    return detail


@router.get("/v1/funnel", response_model=Funnel, response_model_exclude_none=False,
            summary="The CLMS funnel: identified -> referred -> acknowledged in time -> accepted -> "
                    "completed -> withdrawn -> school enrolled")
async def get_funnel(agg: Agg, viewer: ViewerDep, months: Months, municipality: MunicipalityFilter,
                     format: Format = "json") -> Any:
    result = service.funnel(agg, viewer=viewer, municipality=municipality, months=months)
    if format == "csv":
        return _csv(service.funnel_csv(result), f"funnel-{municipality or 'all'}.csv")
    return result


@router.get("/v1/time-to-acknowledge", response_model=TimeToAcknowledge,
            summary="Median and 90th percentile time from referral to acknowledgement, per agency")
async def get_time_to_acknowledge(agg: Agg, viewer: ViewerDep, municipality: MunicipalityFilter) -> Any:
    return service.time_to_acknowledge(agg, viewer=viewer, municipality=municipality)


# --- CSV exports (same tables, stable file URLs) -------------------------------------------------


@router.get("/v1/export/municipalities.csv", response_class=PlainTextResponse, summary="CSV of /v1/counts/municipalities")
async def export_municipalities(agg: Agg, viewer: ViewerDep, months: Months) -> Response:
    return _csv(service.municipalities_csv(service.municipality_rows(agg, viewer=viewer, months=months)),
                "municipalities.csv")


@router.get("/v1/export/municipalities/{slug}.csv", response_class=PlainTextResponse,
            summary="CSV of /v1/counts/municipalities/{slug}")
async def export_municipality(slug: Slug, agg: Agg, viewer: ViewerDep, months: Months) -> Response:
    detail = service.municipality_detail(agg, viewer=viewer, slug=slug, months=months)
    return _csv(service.detail_csv(detail), f"municipality-{slug}.csv")


@router.get("/v1/export/funnel.csv", response_class=PlainTextResponse, summary="CSV of /v1/funnel")
async def export_funnel(agg: Agg, viewer: ViewerDep, months: Months, municipality: MunicipalityFilter) -> Response:
    result = service.funnel(agg, viewer=viewer, municipality=municipality, months=months)
    return _csv(service.funnel_csv(result), f"funnel-{municipality or 'all'}.csv")


# --- live stream ---------------------------------------------------------------------------------


@router.get("/v1/stream", summary="Server-sent events: `counts` with every municipality row and the "
                                  "national funnel, pushed when a visible figure changes")
async def stream(request: Request, agg: Agg, viewer: ViewerDep) -> EventSourceResponse:
    live: Live = request.app.state.live
    coalesce_s: float = request.app.state.stream_coalesce_s

    async def events():
        last: bytes | None = None
        while True:
            token = live.token()
            payload = orjson.dumps(service.summary(agg, viewer=viewer))
            if payload != last:
                last = payload
                yield {"event": "counts", "data": payload.decode()}
            if await Live.wait(token, 15.0):
                await asyncio.sleep(coalesce_s)  # fold a burst of events into one push

    return EventSourceResponse(events(), ping=15)


# --- dashboard -----------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
