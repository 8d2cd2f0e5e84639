"""HTTP request and response schemas of the referral API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import (
    AgeBand,
    AgencyType,
    DeclineReason,
    ReferralOutcome,
    ReferralStatus,
    Sector,
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AcknowledgeBody(_Body):
    """No fields: acknowledging says 'we have seen it and we are on it'."""


class AcceptBody(_Body):
    pass


class DeclineBody(_Body):
    reason: DeclineReason = Field(description="Why the agency does not take the referral")


class CompleteBody(_Body):
    outcome: ReferralOutcome = Field(description="What the agency did")


class HistoryItem(BaseModel):
    at: datetime
    actor: str
    action: str
    from_status: ReferralStatus | None
    to_status: ReferralStatus
    detail: dict[str, Any] = {}


class Referral(BaseModel):
    referral_id: uuid.UUID
    case_id: uuid.UUID
    municipality: str
    agency: AgencyType
    office_id: str
    status: ReferralStatus
    priority: Literal["urgent", "high", "normal"]
    rule_id: str
    rule_version: int
    matched_rules: list[str]
    legal_basis: str
    age_band: AgeBand
    sector: Sector
    reported_by: str
    deadline: datetime
    overdue: bool
    overdue_at: datetime | None
    escalated: bool
    escalated_at: datetime | None
    escalated_to: str | None
    escalation_reason: str | None
    decline_reason: DeclineReason | None
    outcome: ReferralOutcome | None
    created_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    accepted_at: datetime | None
    declined_at: datetime | None
    completed_at: datetime | None
    closed_at: datetime | None
    actions: list[str] = Field(description="What may be done next (acknowledge, accept, ...)")


class ReferralDetail(Referral):
    history: list[HistoryItem]


class ReferralPage(BaseModel):
    items: list[Referral]
    count: int
    limit: int
    offset: int
