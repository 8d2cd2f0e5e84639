"""Response schemas of the analytics API (documentation in /docs; the service builds plain
dicts in `service.py` and FastAPI validates them against these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# A count as shown to this viewer: exact (within the viewer's scope), or as published: rounded
# to a multiple of 5, or "c" (suppressed: 1 to 5, or hidden so that such a count cannot be worked
# out by subtraction). See services/analytics/disclosure.py.
Count = int | Literal["c"]


class MunicipalityRow(BaseModel):
    slug: str
    code: str
    name: str
    name_sq: str
    name_sr: str
    population: int | None
    exact: bool = Field(description="true: exact and live (your scope); false: the published snapshot")
    identified: Count
    per_10000: float | None = Field(description="per 10,000 residents, of the count as shown")
    hazardous: Count | None = Field(description="null: breakdowns not offered for this municipality")
    worst_form: Count | None
    referred: Count
    acknowledged_in_time: Count
    accepted: Count
    completed: Count
    withdrawn: Count
    school_enrolled: Count
    open_referrals: int | None = Field(description="exact viewers only (null in the public view)")
    overdue_referrals: int | None


class Disclosure(BaseModel):
    suppressed: str
    rounded_to: int
    breakdowns_from: int
    cadence_seconds: float
    lag_seconds: float


class MunicipalityList(BaseModel):
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    as_of: str | None = Field(None, description="time the published (non-exact) figures describe")
    disclosure: Disclosure
    municipalities: list[MunicipalityRow]


class ReferralCounts(BaseModel):
    open: int
    overdue: int


class MunicipalityDetail(BaseModel):
    slug: str
    name: str
    population: int | None
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    exact: bool
    as_of: str | None = None
    breakdowns_offered: bool
    identified: Count
    by_month: dict[str, Count] | None
    breakdowns: dict[str, dict[str, Count]] | None
    funnel: dict[str, Count]
    referrals: dict[str, ReferralCounts] | None


class FunnelStage(BaseModel):
    stage: str
    count: Count


class Funnel(BaseModel):
    municipality: str | None
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    exact: bool
    as_of: str | None = None
    stages: list[FunnelStage]
    referrals_by_agency: dict[str, ReferralCounts] | None
    municipalities: dict[str, dict[str, Count]] | None = None


class AgencyAckTime(BaseModel):
    agency: str
    acknowledged: int
    median_seconds: float | None
    p90_seconds: float | None


class TimeToAcknowledge(BaseModel):
    municipality: str | None
    relative_error: float
    agencies: list[AgencyAckTime]
