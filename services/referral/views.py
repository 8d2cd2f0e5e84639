"""HTTP API of the referral service (thin: parse, call a use case, answer). Refusals are the use
cases' `shared.errors`, answered by `shared.web` (403, 404, 409 `{"message", "current_status"}`)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from services.referral import service
from services.referral.deps import Deps, DepsDep
from services.referral.models import (
    AcceptBody,
    AcknowledgeBody,
    CompleteBody,
    DeclineBody,
    Referral,
    ReferralDetail,
    ReferralPage,
)
from services.referral.rules import Action, Filters
from shared.auth import Claims, CurrentClaims
from shared.events import AgencyType, Municipality, ReferralStatus

router = APIRouter(prefix="/v1/referrals", tags=["referrals"])

_ERRORS = {
    401: {"description": "No or invalid bearer token"},
    403: {"description": "The referral (or the filter) is outside the caller's agency/municipality"},
}


@router.get("", response_model=ReferralPage, responses=_ERRORS,
            summary="Referrals the caller may see, most pressing deadline first")
async def list_referrals(
    deps: DepsDep,
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
    filters = Filters(case_id=case_id, agency=agency, municipality=municipality,
                      status=status_, overdue=overdue, limit=limit, offset=offset)
    rows, _ = await service.list_referrals(deps, claims=claims, filters=filters)
    items = [Referral.model_validate(r) for r in rows]
    return ReferralPage(items=items, count=len(items), limit=limit, offset=offset)


@router.get("/{referral_id}", response_model=ReferralDetail, responses={**_ERRORS, 404: {}},
            summary="One referral with its audit history")
async def get_referral(referral_id: uuid.UUID, deps: DepsDep, claims: CurrentClaims) -> ReferralDetail:
    row = await service.get_referral(deps, claims=claims, referral_id=referral_id)
    return ReferralDetail.model_validate(row)


async def _act(deps: Deps, claims: Claims, referral_id: uuid.UUID, action: Action, **kw) -> Referral:  # noqa: ANN003
    row = await service.act(deps, claims=claims, referral_id=referral_id, action=action, **kw)
    return Referral.model_validate(row)


_ACT_ERRORS = {**_ERRORS, 404: {"description": "No such referral"},
               409: {"description": "Not a legal transition from the current status (named)"}}


@router.post("/{referral_id}/acknowledge", response_model=Referral, responses=_ACT_ERRORS,
             summary="pending -> acknowledged (records whether it was within the deadline)")
async def acknowledge(referral_id: uuid.UUID, deps: DepsDep, claims: CurrentClaims,
                      body: AcknowledgeBody | None = None) -> Referral:
    return await _act(deps, claims, referral_id, Action.acknowledge)


@router.post("/{referral_id}/accept", response_model=Referral, responses=_ACT_ERRORS,
             summary="acknowledged -> accepted")
async def accept(referral_id: uuid.UUID, deps: DepsDep, claims: CurrentClaims,
                 body: AcceptBody | None = None) -> Referral:
    return await _act(deps, claims, referral_id, Action.accept)


@router.post("/{referral_id}/decline", response_model=Referral, responses=_ACT_ERRORS,
             summary="acknowledged -> declined (with a reason); escalated to the coordinator")
async def decline(referral_id: uuid.UUID, body: DeclineBody, deps: DepsDep, claims: CurrentClaims) -> Referral:
    return await _act(deps, claims, referral_id, Action.decline, reason=body.reason)


@router.post("/{referral_id}/complete", response_model=Referral, responses=_ACT_ERRORS,
             summary="accepted -> completed (with an outcome)")
async def complete(referral_id: uuid.UUID, body: CompleteBody, deps: DepsDep, claims: CurrentClaims) -> Referral:
    return await _act(deps, claims, referral_id, Action.complete, outcome=body.outcome)
