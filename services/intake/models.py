"""Request and response schemas of intake (pydantic v2), and the inbound CloudEvent.

An identification carries personal data (names, date of birth, guardian contact, notes): it is
validated here, encrypted at rest by the service, and never published. Everything published
is a `shared.events.CaseIdentified` (pseudonym and categories only).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from shared.events import (
    IDENTIFICATION_SUBMITTED,
    AgeBand,
    AgencyType,
    CaseClosedReason,
    Community,
    Municipality,
    ReportSource,
    SchoolStatus,
    Sector,
    Sex,
)
from services.intake import rules

EARLIEST_DATE = date(2000, 1, 1)

try:  # Kosovo's civil date decides what "in the future" means, not the server's UTC date
    from zoneinfo import ZoneInfo

    _TZ: Any = ZoneInfo("Europe/Belgrade")
except Exception:  # noqa: BLE001 - no tz database: CET without DST is close enough
    _TZ = timezone(timedelta(hours=1))


def today() -> date:
    return datetime.now(_TZ).date()


def _not_future(v: date | None) -> date | None:
    if v is not None and v > today():
        raise ValueError(f"must not be in the future (today is {today().isoformat()})")
    return v


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Phone = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^\+?[0-9][0-9 ()\-]{5,24}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GuardianRelationship(StrEnum):
    mother = "mother"
    father = "father"
    grandparent = "grandparent"
    sibling = "sibling"
    other_relative = "other_relative"
    legal_guardian = "legal_guardian"
    other = "other"


class Guardian(Strict):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)] | None = None
    relationship: GuardianRelationship | None = None
    phone: Phone | None = Field(None, description="Digits, spaces, (), - and an optional leading +")


class ChildIn(Strict):
    given_name: Text
    family_name: Text
    date_of_birth: date | None = Field(None, description="Give this or estimated_age")
    estimated_age: int | None = Field(None, ge=0, le=rules.MAX_AGE, description="Years, 0-17, when the date of birth is unknown")
    sex: Sex
    community: Community = Community.undisclosed
    school_status: SchoolStatus = SchoolStatus.unknown
    guardian: Guardian | None = None

    @field_validator("date_of_birth")
    @classmethod
    def _dob(cls, v: date | None) -> date | None:
        return _not_future(v)

    @model_validator(mode="after")
    def _some_age(self) -> "ChildIn":
        if self.date_of_birth is None and self.estimated_age is None:
            raise ValueError("give date_of_birth (YYYY-MM-DD) or estimated_age (0-17)")
        return self


class WorkIn(Strict):
    sector: Sector
    activity: str = Field(min_length=1, max_length=64, description="Activity code of the sector (see activities.yaml)")
    hazardous: bool = False
    employer_involved: bool = Field(False, description="A workplace or an employer is involved")

    @model_validator(mode="after")
    def _activity_of_sector(self) -> "WorkIn":
        rules.check_activity(self.sector, self.activity)
        return self


class IdentificationRequest(Strict):
    """One identified child. Also the exact `data` of an inbound `identification.submitted` event."""

    municipality: Municipality = Field(description="Municipality slug where the child was identified")
    identified_on: date = Field(description="Date of identification, not in the future")
    report_source: ReportSource = ReportSource.officer
    child: ChildIn
    work: WorkIn
    notes: Annotated[str, StringConstraints(max_length=4000)] | None = Field(
        None, description="Free text; encrypted at rest, never published")

    @field_validator("identified_on")
    @classmethod
    def _identified_on(cls, v: date) -> date:
        if v < EARLIEST_DATE:
            raise ValueError(f"must be on or after {EARLIEST_DATE.isoformat()}")
        return _not_future(v)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _age(self) -> "IdentificationRequest":
        dob = self.child.date_of_birth
        if dob is not None:
            if dob > self.identified_on:
                raise ValueError("child.date_of_birth: must not be after identified_on")
            age = rules.age_on(dob, self.identified_on)
            if age > rules.MAX_AGE:
                raise ValueError(
                    f"child.date_of_birth: the child was {age} on identified_on; only children aged "
                    f"0-{rules.MAX_AGE} can be reported"
                )
        return self

    # derived, used by the service
    @property
    def age(self) -> int:
        return rules.age_at_identification(date_of_birth=self.child.date_of_birth,
                                           estimated_age=self.child.estimated_age,
                                           identified_on=self.identified_on)

    @property
    def birth_year(self) -> int:
        return rules.birth_year(date_of_birth=self.child.date_of_birth,
                                estimated_age=self.child.estimated_age,
                                identified_on=self.identified_on)

    def personal(self) -> dict[str, Any]:
        """The part encrypted at rest."""
        c = self.child
        return {
            "given_name": c.given_name,
            "family_name": c.family_name,
            "date_of_birth": c.date_of_birth.isoformat() if c.date_of_birth else None,
            "guardian": c.guardian.model_dump(mode="json") if c.guardian else None,
            "notes": self.notes,
        }


class IdentificationAccepted(BaseModel):
    case_id: uuid.UUID
    child_ref: str = Field(description="Per-case token (ct_...), the one case.identified carries; it links "
                                       "no two cases and no one can recompute it once the case is erased")
    linked_case_id: uuid.UUID | None = Field(
        None, description="The earliest earlier case of the same child, when there is one and the caller "
                          "may read it (else null even when repeat_identification is true)")
    repeat_identification: bool = Field(
        False, description="The same child (same normalised names and birth year) was identified before")
    status: Literal["open"] = "open"


# --- follow-up events --------------------------------------------------------------------------


class _Outcome(Strict):
    on: date = Field(description="Date the agency confirmed it; not in the future")

    @field_validator("on")
    @classmethod
    def _on(cls, v: date) -> date:
        if v < EARLIEST_DATE:
            raise ValueError(f"must be on or after {EARLIEST_DATE.isoformat()}")
        return _not_future(v)  # type: ignore[return-value]


class ChildWithdrawnIn(_Outcome):
    type: Literal["child_withdrawn", "case.child_withdrawn"]


class SchoolEnrolledIn(_Outcome):
    type: Literal["school_enrolled", "case.school_enrolled"]


class ClosedIn(_Outcome):
    type: Literal["closed", "case.closed"]
    reason: CaseClosedReason
    override_reason: str | None = Field(
        None, min_length=10, max_length=500,
        description="The coordinator's reason for closing a worst-form case while a police or prosecution "
                    "referral is still open (shared/access_policy.yaml, case.close_override); recorded on the "
                    "case's event, encrypted like the case's personal data and never put on a topic.")


class UpdatedIn(Strict):
    type: Literal["updated", "case.updated"]
    school_status: SchoolStatus | None = None
    sector: Sector | None = None
    activity: str | None = Field(None, min_length=1, max_length=64)
    hazardous: bool | None = None
    employer_involved: bool | None = None

    @model_validator(mode="after")
    def _something(self) -> "UpdatedIn":
        fields = ("school_status", "sector", "activity", "hazardous", "employer_involved")
        if all(getattr(self, f) is None for f in fields):
            raise ValueError(f"an update must change at least one of {', '.join(fields)}")
        if (self.sector is None) != (self.activity is None):
            raise ValueError("sector and activity change together: give both")
        if self.sector is not None and self.activity is not None:
            rules.check_activity(self.sector, self.activity)
        return self


CaseEventIn = Annotated[
    ChildWithdrawnIn | SchoolEnrolledIn | ClosedIn | UpdatedIn,
    Field(discriminator="type"),
]


class CaseEventAccepted(BaseModel):
    case_id: uuid.UUID
    event_id: uuid.UUID
    type: str
    status: Literal["open", "closed"]


# --- the case as an authorised reader sees it -------------------------------------------------


class PersonalView(BaseModel):
    given_name: str
    family_name: str
    date_of_birth: date | None
    guardian: Guardian | None
    notes: str | None


class CaseHistoryItem(BaseModel):
    event_id: uuid.UUID
    type: str
    at: datetime
    by: str
    agency: str
    on: date | None = Field(None, description="The day the agency confirmed a withdrawal, an enrolment or the "
                                              "closure (kept here, not published on clms.case-events)")
    detail: dict[str, Any] | None = Field(None, description="e.g. the coordinator's override_reason")


class CaseView(BaseModel):
    case_id: uuid.UUID
    child_ref: str | None = Field(description="The case's per-case token; null once the case was erased")
    linked_case_id: uuid.UUID | None = Field(
        description="The earliest earlier case of the same child, when the reader may read that case too")
    repeat_identification: bool = Field(False, description="The same child was identified before")
    municipality: str
    status: Literal["open", "closed"]
    identified_on: date
    report_source: ReportSource
    reporter_agency: AgencyType
    reporter_municipality: str
    reported_by: str
    age_at_identification: int
    age_band: AgeBand
    compulsory_school_age: bool
    sex: Sex
    community: Community
    school_status: SchoolStatus
    sector: Sector
    activity: str
    hazardous: bool
    worst_form: bool
    employer_involved: bool
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None = None
    personal: PersonalView | None = Field(description="Decrypted personal data; null once erased")
    history: list[CaseHistoryItem]
    referred_to: list[str] = Field(default_factory=list, description=(
        "Agency offices holding a referral for the case (e.g. csw.prizren), as far as intake has "
        "learnt them from clms.referral-events"))


# --- inbound CloudEvent (clms.agency-inbound) -------------------------------------------------

_SUBJECT = r"^[a-z0-9_.\-]{1,200}$"


class InboundEnvelope(BaseModel):
    """A CloudEvent 1.0 (JSON structured mode) an agency system publishes on clms.agency-inbound.

    `source` is `<agency>/<municipality>` of the sending office (an identifying agency);
    `reportedby` (optional extension) is the officer subject, default `<agency>.<municipality>.system`.
    `data` is exactly the body of `POST /v1/identifications`. Other CloudEvents extension
    attributes are accepted and ignored.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"]
    id: str = Field(min_length=1, max_length=200)
    source: str = Field(pattern=r"^[a-z_]+/[a-z0-9_\-]+$", max_length=200,
                        description="<agency>/<municipality slug>, e.g. police/prizren")
    type: Literal["identification.submitted"]
    subject: str | None = Field(None, max_length=200)
    time: datetime | None = None
    datacontenttype: Literal["application/json"] | None = None
    correlationid: str | None = Field(None, min_length=1, max_length=100)
    reportedby: str | None = Field(None, pattern=_SUBJECT)
    data: dict[str, Any]

    @field_validator("source")
    @classmethod
    def _agency_source(cls, v: str) -> str:
        agency, municipality = v.split("/", 1)
        allowed = sorted(a.value for a in rules.identifying_agencies())
        if agency not in allowed:
            raise ValueError(f"agency {agency!r} does not identify children; allowed: {', '.join(allowed)}")
        from shared.reference import municipality_slugs

        if municipality not in municipality_slugs():
            raise ValueError(f"unknown municipality {municipality!r}; use one of the 38 slugs, e.g. 'prizren'")
        return v

    @property
    def agency(self) -> AgencyType:
        return AgencyType(self.source.split("/", 1)[0])

    @property
    def municipality(self) -> str:
        return self.source.split("/", 1)[1]

    @property
    def dedupe_id(self) -> uuid.UUID:
        """CloudEvents ids are unique per source: the inbox key is derived from both."""
        return uuid.uuid5(uuid.NAMESPACE_URL, f"clms-inbound:{self.source}:{self.id}")


assert IDENTIFICATION_SUBMITTED == "identification.submitted"
