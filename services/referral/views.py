"""HTTP API of the referral service (thin: parse, call a use case, answer)."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status

from services.referral import service
from services.referral.models import (
    AcceptBody,
    AcknowledgeBody,
    CompleteBody,
    DeclineBody,
    Referral,
    ReferralDetail,
    ReferralPage,
)
from services.referral.states import Action
from shared.auth import CurrentClaims
from shared.events import AgencyType, Municipality, ReferralStatus


def _deps(request: Request) -> service.Deps:
    return request.app.state.deps


Deps = Annotated[service.Deps, Depends(_deps)]

router = APIRouter(prefix="/v1/referrals", tags=["referrals"])
log = logging.getLogger("clms.referral.audit")

_ERRORS = {
    401: {"description": "No or invalid bearer token"},
    403: {"description": "The referral (or the filter) is outside the caller's agency/municipality"},
}


def _http(exc: Exception) -> HTTPException:
    if isinstance(exc, service.NotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, service.Forbidden):
        return HTTPException(status.HTTP_403_FORBIDDEN, str(exc))
    if isinstance(exc, service.Conflict):
        return HTTPException(status.HTTP_409_CONFLICT, {"message": str(exc), "current_status": exc.current})
    raise exc


@router.get("", response_model=ReferralPage, responses=_ERRORS,
            summary="Referrals the caller may see, most pressing deadline first")
async def list_referrals(
    deps: Deps,
    claims: CurrentClaims,
    case_id: uuid.UUID | None = None,
    agency: AgencyType | None = None,
    municipality: Annotated[Municipality | None, Query()] = None,
    status_: Annotated[ReferralStatus | None, Query(alias="status")] = None,
    overdue: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ReferralPage:
    """Caseworkers, duty officers and supervisors see referrals addressed to their agency in
    their municipality; the municipal coordinator sees every referral in the municipality.
    Filtering on another agency or municipality is a 403; other roles get 403."""
    filters = service.Filters(case_id=case_id, agency=agency, municipality=municipality,
                              status=status_, overdue=overdue, limit=limit, offset=offset)
    try:
        rows, _ = await service.list_referrals(deps, claims=claims, filters=filters)
    except (service.Forbidden,) as exc:
        raise _http(exc) from None
    items = [Referral.model_validate(service.to_public(r)) for r in rows]
    return ReferralPage(items=items, count=len(items), limit=limit, offset=offset)


@router.get("/{referral_id}", response_model=ReferralDetail, responses={**_ERRORS, 404: {}},
            summary="One referral with its audit history")
async def get_referral(referral_id: uuid.UUID, deps: Deps, claims: CurrentClaims) -> ReferralDetail:
    try:
        row = await service.get_referral(deps, claims=claims, referral_id=referral_id)
    except (service.NotFound, service.Forbidden) as exc:
        raise _http(exc) from None
    return ReferralDetail.model_validate(service.to_public(row))


async def _act(deps: service.Deps, claims, referral_id: uuid.UUID, action: Action, **kw) -> Referral:
    try:
        row = await service.act(deps, claims=claims, referral_id=referral_id, action=action, **kw)
    except (service.NotFound, service.Forbidden, service.Conflict) as exc:
        # refused attempts are audited too (ids and subjects only; accepted ones are in the history)
        log.warning("referral %s refused: %s by %s (%s/%s): %s", action.value, referral_id, claims.sub,
                    claims.agency.value, claims.municipality, type(exc).__name__)
        raise _http(exc) from None
    return Referral.model_validate(service.to_public(row))


_ACT_ERRORS = {**_ERRORS, 404: {"description": "No such referral"},
               409: {"description": "Not a legal transition from the current status (named)"}}


@router.post("/{referral_id}/acknowledge", response_model=Referral, responses=_ACT_ERRORS,
             summary="pending -> acknowledged (records whether it was within the deadline)")
async def acknowledge(referral_id: uuid.UUID, deps: Deps, claims: CurrentClaims,
                      body: AcknowledgeBody | None = None) -> Referral:
    return await _act(deps, claims, referral_id, Action.acknowledge)


@router.post("/{referral_id}/accept", response_model=Referral, responses=_ACT_ERRORS,
             summary="acknowledged -> accepted")
async def accept(referral_id: uuid.UUID, deps: Deps, claims: CurrentClaims,
                 body: AcceptBody | None = None) -> Referral:
    return await _act(deps, claims, referral_id, Action.accept)


@router.post("/{referral_id}/decline", response_model=Referral, responses=_ACT_ERRORS,
             summary="acknowledged -> declined (with a reason); escalated to the coordinator")
async def decline(referral_id: uuid.UUID, body: DeclineBody, deps: Deps, claims: CurrentClaims) -> Referral:
    return await _act(deps, claims, referral_id, Action.decline, reason=body.reason)


@router.post("/{referral_id}/complete", response_model=Referral, responses=_ACT_ERRORS,
             summary="accepted -> completed (with an outcome)")
async def complete(referral_id: uuid.UUID, body: CompleteBody, deps: Deps, claims: CurrentClaims) -> Referral:
    return await _act(deps, claims, referral_id, Action.complete, outcome=body.outcome)
