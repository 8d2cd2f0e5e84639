"""Response schemas of the analytics API (documentation in /docs; the service builds plain
dicts in `service.py` and FastAPI validates them against these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# A count as shown to this viewer: exact, or "<5" for 1..4 when the viewer may not see it exactly.
Count = int | Literal["<5"]


class MunicipalityRow(BaseModel):
    slug: str
    code: str
    name: str
    name_sq: str
    name_sr: str
    population: int | None
    identified: Count
    per_10000: float | None
    hazardous: Count
    worst_form: Count
    referred: Count
    acknowledged_in_time: Count
    accepted: Count
    completed: Count
    withdrawn: Count
    school_enrolled: Count
    open_referrals: Count
    overdue_referrals: Count


class MunicipalityList(BaseModel):
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    suppressed_below: int
    municipalities: list[MunicipalityRow]


class ReferralCounts(BaseModel):
    open: Count
    overdue: Count


class MunicipalityDetail(BaseModel):
    slug: str
    name: str
    population: int | None
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    exact: bool
    identified: Count
    by_month: dict[str, Count]
    breakdowns: dict[str, dict[str, Count]]
    funnel: dict[str, Count]
    referrals: dict[str, ReferralCounts]


class FunnelStage(BaseModel):
    stage: str
    count: Count


class Funnel(BaseModel):
    municipality: str | None
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    stages: list[FunnelStage]
    referrals_by_agency: dict[str, ReferralCounts]
    municipalities: dict[str, dict[str, Count]] | None = None


class AgencyAckTime(BaseModel):
    agency: str
    acknowledged: Count
    median_seconds: float | None
    p90_seconds: float | None


class TimeToAcknowledge(BaseModel):
    municipality: str | None
    relative_error: float
    agencies: list[AgencyAckTime]
