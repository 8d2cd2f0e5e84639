"""Thin HTTP layer: parse, authenticate, call a use case, answer."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Path, Request, Response, status

from shared.auth import Claims, CurrentClaims  # an async dependency: no thread hop per request
from shared.logs import current_correlation_id
from services.intake import service
from services.intake.deps import Deps
from services.intake.models import (
    CaseEventAccepted,
    CaseEventIn,
    CaseView,
    IdentificationAccepted,
    IdentificationRequest,
)

router = APIRouter(prefix="/v1", tags=["intake"])

_CORRELATION = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")

ERRORS = {
    401: {"description": "No or invalid bearer token"},
    403: {"description": "The token's agency, municipality or role may not do this"},
    422: {"description": "A field is invalid; the message names it and the allowed values"},
    503: {"description": "The case database is unavailable; retry shortly"},
}


async def get_deps(request: Request) -> Deps:
    return request.app.state.deps


DepsDep = Annotated[Deps, Depends(get_deps)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
           description="Any unique string (e.g. a UUID): a retried request with the same key and body "
                       "returns the first answer instead of creating a second case"),
]
CorrelationId = Annotated[str | None, Header(alias="X-Correlation-ID", max_length=200)]
CaseId = Annotated[uuid.UUID, Path(description="The case id returned by POST /v1/identifications")]


def actor_of(claims: Claims, request: Request) -> service.Actor:
    return service.Actor(sub=claims.sub, agency=claims.agency, municipality=claims.municipality,
                         roles=claims.roles, channel="http",
                         client_addr=request.client.host if request.client else None)


def _correlation(value: str | None) -> str | None:
    """The request's correlation id (set by shared.web's middleware from X-Correlation-ID or new);
    it becomes the correlationid of the case events this request causes."""
    bound = current_correlation_id()
    if bound:
        return bound
    return value if value and _CORRELATION.match(value) else None


@router.post(
    "/identifications",
    status_code=status.HTTP_201_CREATED,
    response_model=IdentificationAccepted,
    summary="Record an identified child; returns case_id and child_ref",
    responses={**ERRORS, 409: {"description": "-"}},
)
async def post_identification(
    body: Annotated[IdentificationRequest, Body()],
    claims: CurrentClaims,
    request: Request,
    response: Response,
    deps: DepsDep,
    idempotency_key: IdempotencyKey = None,
    x_correlation_id: CorrelationId = None,
) -> IdentificationAccepted:
    result = await service.identify(
        deps, actor=actor_of(claims, request), request=body, idempotency_key=idempotency_key,
        correlationid=_correlation(x_correlation_id),
    )
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/cases/{result.answer.case_id}"
    request.app.state.metrics.identifications.labels("http", "replayed" if result.replayed else "created").inc()
    return result.answer


@router.get(
    "/cases/{case_id}",
    response_model=CaseView,
    summary="The case with its decrypted personal data, for authorised readers (every read is audited)",
    responses={**ERRORS, 404: {"description": "No such case"}},
)
async def get_case(case_id: CaseId, claims: CurrentClaims, request: Request, deps: DepsDep) -> CaseView:
    return await service.get_case(deps, actor=actor_of(claims, request), case_id=case_id)


@router.post(
    "/cases/{case_id}/events",
    status_code=status.HTTP_201_CREATED,
    response_model=CaseEventAccepted,
    summary="Record what happened: child_withdrawn, school_enrolled, closed or updated",
    responses={**ERRORS, 404: {"description": "No such case"}, 409: {"description": "The case is closed"}},
)
async def post_case_event(
    case_id: CaseId,
    event: Annotated[CaseEventIn, Body()],
    claims: CurrentClaims,
    request: Request,
    deps: DepsDep,
    x_correlation_id: CorrelationId = None,
) -> CaseEventAccepted:
    return await service.record_case_event(deps, actor=actor_of(claims, request), case_id=case_id,
                                           event=event, correlationid=_correlation(x_correlation_id))
