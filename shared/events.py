"""The event contract: a CloudEvents 1.0 envelope and one frozen payload model per event type.

These models are the single source of truth. JSON Schema and the AsyncAPI document in `docs/`
are generated from them (`clms schema`). Within a schema version only additive, optional
changes are allowed; anything else is a new version.

No payload carries a name, birth date, address, phone number or free text: a child is
`child_ref` (a per-case token, see CaseIdentified) and an age band. `tests/unit/test_events.py` walks every
model and fails if a field looks like personal data.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.reference import municipality_slugs

SCHEMA_VERSION = 1
SPECVERSION = "1.0"

# Ingress type (not a case fact, not in EVENT_TYPES): an agency system publishes an
# identification onto clms.agency-inbound as a CloudEvent of this type; its `data` is exactly the
# body of intake's POST /v1/identifications (it carries identity; intake validates, encrypts and
# republishes only a CaseIdentified). See services/intake/README.md.
IDENTIFICATION_SUBMITTED = "identification.submitted"


# --- vocabulary ------------------------------------------------------------------------------


class AgencyType(StrEnum):
    police = "police"
    csw = "csw"  # Centre for Social Work
    education = "education"  # Municipal Education Directorate
    labour_inspectorate = "labour_inspectorate"
    prosecution = "prosecution"  # Basic Prosecution Office
    ngo = "ngo"
    coordinator = "coordinator"  # municipal CLMS coordinator


class ReportSource(StrEnum):
    """Who first noticed the child: an agency officer on duty, or a citizen / NGO report."""

    officer = "officer"
    citizen = "citizen"
    ngo = "ngo"


class Sector(StrEnum):
    street_work = "street_work"
    begging = "begging"
    agriculture = "agriculture"
    construction = "construction"
    scrap_metal_waste = "scrap_metal_waste"
    extractive = "extractive"
    domestic_work = "domestic_work"
    commercial_sexual_exploitation = "commercial_sexual_exploitation"
    trafficking = "trafficking"
    illicit_activities = "illicit_activities"
    other = "other"


# ILO C182 Art. 3(a)-(c): unconditional worst forms. Forced begging is treated as 3(a).
WORST_FORM_SECTORS: frozenset[Sector] = frozenset(
    {Sector.commercial_sexual_exploitation, Sector.trafficking, Sector.illicit_activities}
)


class Sex(StrEnum):
    female = "female"
    male = "male"
    other = "other"
    unknown = "unknown"


class Community(StrEnum):
    albanian = "albanian"
    serbian = "serbian"
    roma = "roma"
    ashkali = "ashkali"
    egyptian = "egyptian"
    bosniak = "bosniak"
    turkish = "turkish"
    gorani = "gorani"
    other = "other"
    undisclosed = "undisclosed"


class SchoolStatus(StrEnum):
    enrolled_attending = "enrolled_attending"
    enrolled_irregular = "enrolled_irregular"
    dropped_out = "dropped_out"
    never_enrolled = "never_enrolled"
    unknown = "unknown"


class AgeBand(StrEnum):
    under_10 = "under_10"
    from_10_to_14 = "10_14"
    from_15_to_17 = "15_17"

    @classmethod
    def of(cls, age: int) -> "AgeBand":
        if age < 10:
            return cls.under_10
        if age < 15:
            return cls.from_10_to_14
        return cls.from_15_to_17


class ReferralStatus(StrEnum):
    pending = "pending"
    acknowledged = "acknowledged"
    accepted = "accepted"
    declined = "declined"
    completed = "completed"
    closed = "closed"  # closed because the case closed


class Channel(StrEnum):
    email = "email"
    sms = "sms"
    inapp = "inapp"


def _check_municipality(v: str) -> str:
    if v not in municipality_slugs():
        raise ValueError(
            f"unknown municipality {v!r}; use one of the 38 slugs, e.g. 'prizren', 'prishtine'"
        )
    return v


# A slug from shared/reference/municipalities.csv.
Municipality = Annotated[str, AfterValidator(_check_municipality)]


# --- payloads --------------------------------------------------------------------------------


class EventData(BaseModel):
    """Base of every payload: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)
    event_type: ClassVar[str]


class _CaseData(EventData):
    case_id: uuid.UUID
    municipality: Municipality


class CaseIdentified(_CaseData):
    """A child was identified. What each field is for (issue 15, item 6: every field is there
    because a consumer needs it; R = referral routing rules, A = analytics counts, N =
    notifications, via referral.created):

    | field | consumer | why / how coarse |
    |---|---|---|
    | case_id, municipality | R, A, intake access | the key; routing to the municipality's offices |
    | child_ref | API contract only | a per-case token `ct_...` (HMAC of the case id under the case's data key): links nothing across cases, and nobody can recompute it once `clms erase` destroyed that key. Until this release it was the cross-case HMAC pseudonym `cr_...`; records written then still carry it (README, Privacy) |
    | linked_case_id | none | no longer published (always null; kept so older records parse). Linking two cases of one child stays inside intake, shown only to readers allowed to see both cases |
    | identified_month | A (month of identification) | `YYYY-MM`: no consumer needs the day |
    | identified_on | none | no longer published (null); older records carry the exact date, still understood |
    | reporter_agency, report_source | R, A | citizen/NGO reports go to police for verification; counts by agency |
    | reported_by | R -> N | the officer who reported is alerted about the referrals (officer id, no contact address) |
    | age_band, compulsory_school_age | R, A | the band, never the age or birth date |
    | sex, community | A | breakdowns of the funnel, published only through disclosure control |
    | school_status, sector, hazardous, worst_form, employer_involved | R, A | routing conditions and counts |
    | activity | none | no longer published (null): the rules route on sector and worst_form, which intake derives from the activity |
    """

    event_type: ClassVar[str] = "case.identified"
    child_ref: str = Field(min_length=16, max_length=128,
                           description="Per-case token (ct_...): links no two cases; unrecoverable after erasure")
    linked_case_id: uuid.UUID | None = Field(
        None, description="Deprecated, always null: linking stays inside intake")
    identified_month: str | None = Field(None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$",
                                         description="Month of identification, YYYY-MM")
    identified_on: date | None = Field(None, description="Deprecated (older records): the exact date")
    reporter_agency: AgencyType
    report_source: ReportSource = ReportSource.officer
    reported_by: str = Field(description="Subject (officer id) that recorded the identification")
    age_band: AgeBand
    compulsory_school_age: bool = Field(description="Child is 6-15, the compulsory-school ages")
    sex: Sex
    community: Community
    school_status: SchoolStatus
    sector: Sector
    activity: str | None = Field(None, max_length=64, pattern=r"^[a-z0-9_]+$",
                                 description="Deprecated (older records): activity code, never free text")
    hazardous: bool
    worst_form: bool
    employer_involved: bool

    @model_validator(mode="after")
    def _month_or_date(self) -> "CaseIdentified":
        if self.identified_month is None and self.identified_on is None:
            raise ValueError("identified_month: field required (YYYY-MM)")
        return self

    @property
    def month(self) -> str:
        """YYYY-MM of the identification, from either form."""
        if self.identified_month is not None:
            return self.identified_month
        assert self.identified_on is not None
        return f"{self.identified_on.year:04d}-{self.identified_on.month:02d}"


class CaseUpdated(_CaseData):
    """Changed categories only (R re-routes, A moves the case between breakdown cells):
    school_status, sector, hazardous, employer_involved as in CaseIdentified; the activity code
    and the caseworker's id are not published (no consumer needs them). `updated_by_agency` has
    no consumer in this repository either; it stays because it is the provenance of the fact
    (which agency asserts it) for agency systems reading the topic, and it tells nothing the
    envelope's `source` (`<agency>/<municipality>`) does not already say: an agency, never an
    officer."""

    event_type: ClassVar[str] = "case.updated"
    school_status: SchoolStatus | None = None
    sector: Sector | None = None
    hazardous: bool | None = None
    employer_involved: bool | None = None
    updated_by_agency: AgencyType


class _CaseOutcome(_CaseData):
    """Withdrawn / enrolled / closed: A counts the stage reached, R closes the case's open
    referrals on case.closed (`reason`, which N renders in the referral.closed alert).

    | field | consumer | why / how coarse |
    |---|---|---|
    | case_id, municipality | R, A | the key; the municipality's counts |
    | on | none | no longer published (null): no consumer reads the day the agency confirmed it, and an exact per-case date helps single a child out. Intake keeps it (`intake.case_events.confirmed_on`, shown in the case's history to those who may read the case). Records written before this change carry it and still parse |
    | confirmed_by_agency | none in this repository | the provenance of the fact (which agency asserts it) for agency systems reading the topic; the envelope's `source` (`<agency>/<municipality>`) already names that agency, so it adds nothing; an agency, never an officer |
    | reason (case.closed) | R -> N | R closes the open referrals with it, N puts it in the referral.closed alert |
    """

    on: date | None = Field(None, description="Deprecated, not published (older records): the day the agency "
                                              "confirmed it; intake keeps it in the case's history")
    confirmed_by_agency: AgencyType


class CaseChildWithdrawn(_CaseOutcome):
    event_type: ClassVar[str] = "case.child_withdrawn"


class CaseSchoolEnrolled(_CaseOutcome):
    event_type: ClassVar[str] = "case.school_enrolled"


class CaseClosedReason(StrEnum):
    resolved = "resolved"
    duplicate = "duplicate"
    moved_away = "moved_away"
    turned_18 = "turned_18"
    unfounded = "unfounded"


class CaseClosed(_CaseOutcome):
    event_type: ClassVar[str] = "case.closed"
    reason: CaseClosedReason


class _ReferralData(EventData):
    """Every referral event: ids (intake grants access per referral, A counts per referral),
    municipality and agency (A's open/overdue counts, N's audience), office_id (N resolves the
    duty officers of that office; intake records the office that may read the case)."""

    referral_id: uuid.UUID
    case_id: uuid.UUID
    municipality: Municipality
    agency: AgencyType
    office_id: str = Field(description="Agency office that serves the municipality, e.g. csw.prizren")


class ReferralCreated(_ReferralData):
    """rule_id/rule_version/legal_basis/priority/deadline: N renders them in the alert and picks
    the channels by priority; age_band and sector: N's alert text (categories, never identity);
    reported_by: N alerts the reporting officer (an officer id, never a contact address)."""

    event_type: ClassVar[str] = "referral.created"
    rule_id: str
    rule_version: int
    priority: Literal["urgent", "high", "normal"]
    deadline: datetime
    legal_basis: str
    age_band: AgeBand
    sector: Sector
    reported_by: str


class ReferralActed(_ReferralData):
    """from_status/to_status: A's funnel, N's follow-up alerts. `actor` (the officer's id) is no
    longer published (null): no consumer reads it, and the referral service keeps who acted in
    its own history (`GET /v1/referrals/{id}`). Older records carry it and still parse."""

    actor: str | None = Field(None, description="Deprecated, not published: who acted is in the referral's history")
    from_status: ReferralStatus
    to_status: ReferralStatus


class ReferralAcknowledged(ReferralActed):
    event_type: ClassVar[str] = "referral.acknowledged"
    within_deadline: bool


class ReferralAccepted(ReferralActed):
    event_type: ClassVar[str] = "referral.accepted"


class DeclineReason(StrEnum):
    not_in_mandate = "not_in_mandate"
    already_handled = "already_handled"
    insufficient_information = "insufficient_information"
    wrong_municipality = "wrong_municipality"
    other = "other"


class ReferralDeclined(ReferralActed):
    event_type: ClassVar[str] = "referral.declined"
    reason: DeclineReason


class ReferralOutcome(StrEnum):
    family_visited = "family_visited"
    social_assistance_granted = "social_assistance_granted"
    child_enrolled_in_school = "child_enrolled_in_school"
    inspection_carried_out = "inspection_carried_out"
    criminal_report_filed = "criminal_report_filed"
    verified_no_action = "verified_no_action"
    other = "other"


class ReferralCompleted(ReferralActed):
    event_type: ClassVar[str] = "referral.completed"
    outcome: ReferralOutcome


class ReferralClosed(ReferralActed):
    """The case closed, so an open referral closes with it (no deadline, no escalation after)."""

    event_type: ClassVar[str] = "referral.closed"
    case_reason: CaseClosedReason


class ReferralOverdue(_ReferralData):
    event_type: ClassVar[str] = "referral.overdue"
    deadline: datetime
    status: ReferralStatus


class ReferralEscalated(_ReferralData):
    """escalated_to: N alerts that coordinator; reason: N's alert text."""

    event_type: ClassVar[str] = "referral.escalated"
    reason: Literal["overdue", "declined", "unacknowledged_alert"]
    escalated_to: str = Field(description="Subject of the coordinator the referral was escalated to")


class _NotificationData(EventData):
    """A counts notifications by channel and outcome (referral_id/case_id: the key and the case
    state). `recipient` (the officer's id) is no longer published (null): no consumer reads it;
    `notification_id` is uuid5(event id, officer, channel), so whoever knows an officer can still
    match a notification, and the notifications service keeps the recipient in its own tables.
    NotificationFailed.error is redacted of e-mail addresses and phone numbers (shared.redact)
    before it is stored or published."""

    notification_id: uuid.UUID
    referral_id: uuid.UUID | None = None
    case_id: uuid.UUID | None = None
    recipient: str | None = Field(None, description="Deprecated, not published: the officer is in the "
                                                    "notifications service's own tables")
    channel: Channel
    cause_event_type: str


class NotificationSent(_NotificationData):
    event_type: ClassVar[str] = "notification.sent"
    attempt: int = Field(ge=1)


class NotificationFailed(_NotificationData):
    event_type: ClassVar[str] = "notification.failed"
    attempts: int = Field(ge=1)
    error: str = Field(max_length=500, description="Error class and message, never message content")


class NotificationAcknowledged(_NotificationData):
    event_type: ClassVar[str] = "notification.acknowledged"
    seconds_to_ack: float = Field(ge=0)


EVENT_TYPES: dict[str, type[EventData]] = {
    m.event_type: m
    for m in (
        CaseIdentified,
        CaseUpdated,
        CaseChildWithdrawn,
        CaseSchoolEnrolled,
        CaseClosed,
        ReferralCreated,
        ReferralAcknowledged,
        ReferralAccepted,
        ReferralDeclined,
        ReferralCompleted,
        ReferralClosed,
        ReferralOverdue,
        ReferralEscalated,
        NotificationSent,
        NotificationFailed,
        NotificationAcknowledged,
    )
}


def dataschema_for(event_type: str, version: int = SCHEMA_VERSION) -> str:
    return f"urn:clms:events:{event_type}:v{version}"


# --- envelope --------------------------------------------------------------------------------


class Envelope(BaseModel):
    """CloudEvents 1.0, JSON structured mode, with correlation/causation extensions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = SPECVERSION
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    source: str = Field(min_length=1, max_length=200, pattern=r"^[a-z0-9_.\-/]+$")
    type: str
    subject: str = Field(min_length=1, max_length=100, description="The case id")
    time: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str
    schemaversion: int = SCHEMA_VERSION
    correlationid: str = Field(min_length=1, max_length=100)
    causationid: str | None = Field(None, max_length=100)
    traceparent: str | None = Field(
        None, pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        description="W3C trace context (CloudEvents distributed-tracing extension), carried as received",
    )
    data: SerializeAsAny[EventData]

    @model_validator(mode="before")
    @classmethod
    def _typed_data(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        etype = values.get("type")
        model = EVENT_TYPES.get(etype) if isinstance(etype, str) else None
        if model is None:
            known = ", ".join(sorted(EVENT_TYPES))
            raise ValueError(f"type: unknown event type {etype!r}; known types: {known}")
        values = dict(values)
        values.setdefault("dataschema", dataschema_for(etype))
        data = values.get("data")
        if isinstance(data, EventData) and not isinstance(data, model):
            raise ValueError(f"data: a {type(data).__name__} cannot be the data of a {etype} event")
        if isinstance(data, dict):
            try:
                values["data"] = model.model_validate(data)
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, prefix="data.")) from None
        elif data is None:
            raise ValueError("data: field required")
        return values

    @field_validator("time")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("time must carry a timezone (RFC 3339), e.g. 2026-01-31T10:00:00Z")
        return v

    # --- construction helpers ----------------------------------------------------------------
    @classmethod
    def wrap(
        cls,
        data: EventData,
        *,
        source: str,
        subject: str | uuid.UUID,
        correlationid: str | uuid.UUID | None = None,
        causationid: str | uuid.UUID | None = None,
        id: uuid.UUID | None = None,
        time: datetime | None = None,
        traceparent: str | None = None,
    ) -> "Envelope":
        """A new event. Correlation id and trace context default to the ones bound to the
        current request or event (`shared.logs`), so callers rarely pass them."""
        from shared.logs import current_correlation_id, current_traceparent

        event_id = id or uuid.uuid4()
        correlationid = correlationid or current_correlation_id()
        return cls(
            id=event_id,
            source=source,
            type=data.event_type,
            subject=str(subject),
            time=time or datetime.now(timezone.utc),
            dataschema=dataschema_for(data.event_type),
            correlationid=str(correlationid or event_id),
            causationid=str(causationid) if causationid else None,
            traceparent=traceparent or current_traceparent(),
            data=data,
        )

    def follow(self, data: EventData, *, source: str, subject: str | uuid.UUID | None = None,
               id: uuid.UUID | None = None) -> "Envelope":
        """A new event caused by this one: same correlation id, causation = this id."""
        return Envelope.wrap(
            data,
            source=source,
            subject=subject or self.subject,
            correlationid=self.correlationid,
            causationid=self.id,
            id=id,
            traceparent=self.traceparent,
        )

    @property
    def key(self) -> bytes:
        """Kafka key: the case id, so one case's events stay in order on one partition."""
        return self.subject.encode()

    def to_json_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers mirroring CloudEvents binary-mode attributes, for tracing tools."""
        return [
            ("ce_id", str(self.id).encode()),
            ("ce_type", self.type.encode()),
            ("ce_source", self.source.encode()),
            ("correlation_id", self.correlationid.encode()),
            *([("traceparent", self.traceparent.encode())] if self.traceparent else []),
        ]


class EnvelopeError(ValueError):
    """A message that is not a valid envelope. `reason` names the field and what was wrong."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def describe_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """One sentence per error, each starting with the dotted path of the field."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_envelope(raw: bytes | str | dict) -> Envelope:
    """Decode and validate one envelope; raise `EnvelopeError` naming the offending field."""
    if isinstance(raw, (bytes, bytearray, memoryview, str)):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeError(f"invalid JSON: {exc}") from None
    else:
        obj = raw
    if not isinstance(obj, dict):
        raise EnvelopeError("envelope: expected a JSON object")
    try:
        return Envelope.model_validate(obj)
    except ValidationError as exc:
        raise EnvelopeError(describe_validation_error(exc)) from None
