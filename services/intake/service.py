"""Intake use cases (keyword-only functions). One transaction per use case: the state change, its
audit row and its outbox row commit together or not at all.

Used by the HTTP views, the clms.agency-inbound consumer (same `identify` path as HTTP) and the
`clms erase` command.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import asyncpg
import orjson
from pydantic import ValidationError

from shared import access, outbox
from shared.events import (
    IDENTIFICATION_SUBMITTED,
    AgencyType,
    CaseChildWithdrawn,
    CaseClosed,
    CaseIdentified,
    CaseSchoolEnrolled,
    CaseUpdated,
    Envelope,
    EventData,
    ReferralClosed,
    ReferralCompleted,
    ReferralCreated,
    ReferralDeclined,
    SchoolStatus,
    describe_validation_error,
)
from shared.settings import Settings
from shared.topics import Topic
from services.intake import rules
from services.intake.crypto import ERASED_CHILD_REF, CaseCipher
from services.intake.inbound import InboundGate, InboundRejected
from services.intake.models import (
    CaseEventAccepted,
    CaseHistoryItem,
    CaseView,
    ChildWithdrawnIn,
    ClosedIn,
    IdentificationAccepted,
    IdentificationRequest,
    InboundEnvelope,
    PersonalView,
    SchoolEnrolledIn,
    UpdatedIn,
)

SCHEMA = "intake"
REFERRAL_ACCESS_CONSUMER = "intake.referral-access"
INBOUND_CONSUMER = "intake.agency-inbound"
# Referral events intake keeps: who holds a referral for a case (may read it) and whether it is
# still open (closing a worst-form case waits for open police and prosecution referrals).
REFERRAL_EVENTS_KEPT = frozenset({"referral.created", "referral.completed", "referral.declined",
                                  "referral.closed"})


# --- context and errors ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    sub: str
    agency: AgencyType
    municipality: str
    roles: tuple[str, ...]
    channel: str = "http"  # http | inbound | cli
    client_addr: str | None = None

    @property
    def source(self) -> str:
        """CloudEvents source of events this actor causes: `<agency>/<municipality>`."""
        return f"{self.agency.value}/{self.municipality}" if self.municipality != "*" else "intake"


@dataclass
class Intake:
    """What the use cases need, built once by the composition root."""

    pool: asyncpg.Pool
    settings: Settings
    cipher: CaseCipher
    child_ref_key: bytes
    idempotency_key: bytes = b""  # keys request_hash (IDEMPOTENCY_HMAC_KEY)
    inbound: InboundGate | None = None  # clms.agency-inbound: sender keys and intake's JWE key
    schema: str = SCHEMA
    on_commit: Callable[[], None] = field(default=lambda: None)  # wakes the outbox relay

    @classmethod
    def build(cls, *, pool: asyncpg.Pool, settings: Settings, **kw: Any) -> "Intake":
        return cls(
            pool=pool,
            settings=settings,
            cipher=CaseCipher.from_settings(settings),
            child_ref_key=settings.child_ref_key.get_secret_value().encode(),
            idempotency_key=settings.idempotency_hmac_key.get_secret_value().encode(),
            inbound=kw.pop("inbound", None) or InboundGate.build(settings),
            **kw,
        )


class IntakeError(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Forbidden(IntakeError):
    status = 403


class CaseNotFound(IntakeError):
    status = 404


class Conflict(IntakeError):
    status = 409


class Invalid(IntakeError):
    status = 422


class IdempotencyKeyReused(IntakeError):
    status = 422




async def _audit(conn: asyncpg.Connection, *, actor: Actor, action: str, outcome: str,
                 case_id: uuid.UUID | None) -> None:
    await conn.execute(
        f"insert into {SCHEMA}.audit(actor, actor_agency, actor_municipality, action, outcome, case_id, "
        "client_addr, channel) values($1, $2, $3, $4, $5, $6, $7, $8)",
        actor.sub, actor.agency.value, actor.municipality, action, outcome, case_id,
        actor.client_addr, actor.channel,
    )


def request_hash(key: bytes, request: IdentificationRequest) -> str:
    """HMAC-SHA256 of the whole identification under IDEMPOTENCY_HMAC_KEY. Unkeyed, a dumped
    idempotency row would let anyone confirm a guessed name and birth date offline by hashing
    candidate bodies; keyed, guessing needs the key, which lives only in intake's environment."""
    if not key:
        raise ValueError("IDEMPOTENCY_HMAC_KEY is empty; set a secret (see .env.example)")
    return hmac.new(key, request.model_dump_json().encode(), hashlib.sha256).hexdigest()


async def purge_idempotency_keys(pool: asyncpg.Pool, *, older_than_s: float, batch: int) -> int:
    """Delete Idempotency-Key rows older than `older_than_s`, `batch` rows per statement (short
    transactions, no long lock on a busy table); returns how many were deleted."""
    total = 0
    while True:
        async with pool.acquire() as conn:
            n = await conn.fetchval(
                f"with gone as (delete from {SCHEMA}.idempotency_keys where ctid in ("
                f"select ctid from {SCHEMA}.idempotency_keys "
                "where created_at < now() - make_interval(secs => $1) limit $2) returning 1) "
                "select count(*) from gone", float(older_than_s), batch)
        total += n
        if n < batch:
            return total


# --- identification -------------------------------------------------------------------------------

_INSERT_CASE = f"""
with c as (
    insert into {SCHEMA}.cases(case_id, child_ref, linked_case_id, municipality, identified_on,
        report_source, reporter_agency, reporter_municipality, reported_by, channel,
        age_at_identification, age_band, compulsory_school_age, sex, community, school_status,
        sector, activity, hazardous, worst_form, employer_involved, pii_ciphertext)
    values($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22)
    returning case_id
), k as (
    insert into {SCHEMA}.case_keys(case_id, wrapped_key, master_key_id) select case_id, $23, $24 from c
), h as (
    insert into {SCHEMA}.case_events(event_id, case_id, event_type, actor, agency)
    select $25, case_id, $26, $9, $7 from c
), a as (
    insert into {SCHEMA}.audit(actor, actor_agency, actor_municipality, action, outcome, case_id, client_addr, channel)
    select $9, $7, $8, 'case.create', 'ok', case_id, $27, $10 from c
)
insert into {SCHEMA}.outbox(event_id, topic, key, event_type, envelope)
select $25, $28, case_id::text, $26, $29::jsonb from c
"""


# The common case (no Idempotency-Key, not an inbound event) as ONE statement in its own implicit
# transaction: the child lock + first-case lookup, the five rows of _INSERT_CASE with the linked
# case id patched into the case row and the event, and the linked id returned. One round trip
# instead of four (BEGIN, lookup, insert, COMMIT): bench/README.md, Performance. The advisory
# lock is held to the end of the statement's transaction as before, and first_case_of's lookup
# (plpgsql, volatile) runs on a snapshot taken after the lock.
_IDENTIFY_ONE_STATEMENT = f"""
with l as (
    select coalesce({SCHEMA}.first_case_of($2), $3::uuid) as linked  -- $3 is always null here
), c as (
    insert into {SCHEMA}.cases(case_id, child_ref, linked_case_id, municipality, identified_on,
        report_source, reporter_agency, reporter_municipality, reported_by, channel,
        age_at_identification, age_band, compulsory_school_age, sex, community, school_status,
        sector, activity, hazardous, worst_form, employer_involved, pii_ciphertext)
    select $1,$2,l.linked,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22 from l
    returning case_id, linked_case_id
), k as (
    insert into {SCHEMA}.case_keys(case_id, wrapped_key, master_key_id) select case_id, $23, $24 from c
), h as (
    insert into {SCHEMA}.case_events(event_id, case_id, event_type, actor, agency)
    select $25, case_id, $26, $9, $7 from c
), a as (
    insert into {SCHEMA}.audit(actor, actor_agency, actor_municipality, action, outcome, case_id, client_addr, channel)
    select $9, $7, $8, 'case.create', 'ok', case_id, $27, $10 from c
), o as (
    insert into {SCHEMA}.outbox(event_id, topic, key, event_type, envelope)
    select $25, $28, case_id::text, $26, $29::jsonb from c
)
select linked from l
"""


@dataclass(frozen=True, slots=True)
class Identified:
    answer: IdentificationAccepted
    replayed: bool = False  # the first answer of an Idempotency-Key or an inbound event seen before


async def identify(
    intake: Intake,
    *,
    actor: Actor,
    request: IdentificationRequest,
    idempotency_key: str | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
    case_id: uuid.UUID | None = None,
    inbox_id: uuid.UUID | None = None,
) -> Identified:
    """Record one identification: case row + encrypted personal data + audit + outbox, one transaction.

    `idempotency_key` (HTTP) or `inbox_id` (inbound event) make a retry return the first answer.
    """
    decision = access.allowed(actor, "case.create", access.Resource(municipality=request.municipality))
    if not decision:
        raise Forbidden(decision.reason)
    result = await _identify(intake, actor=actor, request=request, idempotency_key=idempotency_key,
                             correlationid=correlationid, causationid=causationid, case_id=case_id,
                             inbox_id=inbox_id)
    linked = result.answer.linked_case_id
    if linked is not None and not await _may_read(intake, actor=actor, case_id=linked):
        # No identity oracle: a reporter learns of an earlier case of the child only when they
        # may read that case (the link itself stays on the case and its event for the agencies).
        result = Identified(result.answer.model_copy(update={"linked_case_id": None}), replayed=result.replayed)
    return result


async def _may_read(intake: Intake, *, actor: Actor, case_id: uuid.UUID) -> bool:
    async with intake.pool.acquire() as conn:
        case = await conn.fetchrow(f"select case_id, municipality, reporter_agency, reporter_municipality "
                                   f"from {SCHEMA}.cases where case_id = $1", case_id)
        return case is not None and bool(await _authorise(conn, actor=actor, case=case))


async def _identify(intake: Intake, *, actor: Actor, request: IdentificationRequest, idempotency_key: str | None,
                    correlationid: str | None, causationid: str | None, case_id: uuid.UUID | None,
                    inbox_id: uuid.UUID | None) -> Identified:
    case_id = case_id or uuid.uuid4()
    ref = rules.child_ref(intake.child_ref_key, given_name=request.child.given_name,
                          family_name=request.child.family_name, year_of_birth=request.birth_year)
    age = request.age
    worst = rules.is_worst_form(request.work.sector, request.work.activity)
    sealed = intake.cipher.seal(case_id, orjson.dumps(request.personal()))

    if inbox_id is None and idempotency_key is None:
        return await _identify_one_statement(intake, actor=actor, request=request, case_id=case_id, ref=ref,
                                             age=age, worst=worst, sealed=sealed, correlationid=correlationid,
                                             causationid=causationid)

    async with intake.pool.acquire() as conn, conn.transaction():
        if inbox_id is not None:
            claimed = await conn.fetchval(
                f"insert into {SCHEMA}.inbox(event_id, consumer, event_type) values($1, $2, $3) "
                "on conflict do nothing returning 1",
                inbox_id, INBOUND_CONSUMER, IDENTIFICATION_SUBMITTED,
            )
            if claimed is None:
                row = await conn.fetchrow(
                    f"select c.linked_case_id, k.wrapped_key, k.master_key_id from {SCHEMA}.cases c "
                    f"left join {SCHEMA}.case_keys k using (case_id) where c.case_id = $1", case_id)
                token = (intake.cipher.token(case_id, row["wrapped_key"], row["master_key_id"])
                         if row is not None and row["wrapped_key"] is not None else ERASED_CHILD_REF)
                linked = row["linked_case_id"] if row is not None else None
                return Identified(IdentificationAccepted(
                    case_id=case_id, child_ref=token, repeat_identification=linked is not None,
                    linked_case_id=await _visible_link(conn, actor=actor, linked=linked)), replayed=True)
        # serialised per child (advisory lock inside), so the second of two simultaneous reports links
        linked = await conn.fetchval(f"select {SCHEMA}.first_case_of($1)", ref)
        answer = IdentificationAccepted(case_id=case_id, child_ref=sealed.token, repeat_identification=linked is not None,
                                        linked_case_id=await _visible_link(conn, actor=actor, linked=linked))
        if idempotency_key is not None:
            digest = request_hash(intake.idempotency_key, request)  # only a keyed request needs it
            inserted = await conn.fetchval(
                f"insert into {SCHEMA}.idempotency_keys(subject, key, request_hash, case_id, response) "
                "values($1, $2, $3, $4, $5::jsonb) on conflict do nothing returning 1",
                actor.sub, idempotency_key, digest, case_id, answer.model_dump_json(),
            )
            if inserted is None:
                first = await conn.fetchrow(
                    f"select request_hash, response from {SCHEMA}.idempotency_keys where subject = $1 and key = $2",
                    actor.sub, idempotency_key)
                if first["request_hash"] != digest:
                    await _audit(conn, actor=actor, action="case.create", outcome="conflict", case_id=None)
                    raise IdempotencyKeyReused(
                        f"Idempotency-Key {idempotency_key!r} was already used for a different identification; "
                        "send a new key for a new identification, or resend the first body unchanged")
                previous = IdentificationAccepted.model_validate_json(first["response"])
                await _audit(conn, actor=actor, action="case.create", outcome="replayed", case_id=previous.case_id)
                return Identified(previous, replayed=True)

        envelope = _identified_event(actor=actor, request=request, case_id=case_id, token=sealed.token,
                                     age=age, worst=worst, correlationid=correlationid, causationid=causationid)
        # One statement, one round trip: case, wrapped key, history, audit and outbox rows
        # (the outbox columns are those of shared.outbox.append).
        await conn.execute(_INSERT_CASE, *_case_args(actor=actor, request=request, case_id=case_id, ref=ref,
                                                     linked=linked, age=age, worst=worst, sealed=sealed,
                                                     envelope=envelope))
    intake.on_commit()
    return Identified(answer)


async def _identify_one_statement(intake: Intake, *, actor: Actor, request: IdentificationRequest,
                                  case_id: uuid.UUID, ref: str, age: int, worst: bool, sealed: Any,
                                  correlationid: str | None, causationid: str | None) -> Identified:
    # linked_case_id is set by the statement, from the lookup under the child's lock
    envelope = _identified_event(actor=actor, request=request, case_id=case_id, token=sealed.token,
                                 age=age, worst=worst, correlationid=correlationid, causationid=causationid)
    async with intake.pool.acquire() as conn:
        linked = await conn.fetchval(_IDENTIFY_ONE_STATEMENT, *_case_args(
            actor=actor, request=request, case_id=case_id, ref=ref, linked=None, age=age, worst=worst,
            sealed=sealed, envelope=envelope))
        intake.on_commit()
        visible = await _visible_link(conn, actor=actor, linked=linked)
    return Identified(IdentificationAccepted(case_id=case_id, child_ref=sealed.token, linked_case_id=visible,
                                             repeat_identification=linked is not None))


async def _visible_link(conn: asyncpg.Connection, *, actor: Actor, linked: uuid.UUID | None) -> uuid.UUID | None:
    """The linked case id when this actor may read that case too, else None: a link tells that
    two cases are one child, so it is shown only to a reader allowed to see both."""
    if linked is None:
        return None
    case = await conn.fetchrow(f"select case_id, municipality, reporter_agency, reporter_municipality "
                               f"from {SCHEMA}.cases where case_id = $1", linked)
    return linked if case is not None and await _authorise(conn, actor=actor, case=case) else None


def _identified_event(*, actor: Actor, request: IdentificationRequest, case_id: uuid.UUID, token: str,
                      age: int, worst: bool, correlationid: str | None, causationid: str | None) -> Envelope:
    """The published `case.identified`: a per-case token and categories only (no link to other
    cases, the month rather than the day, no activity code: shared.events.CaseIdentified)."""
    child = request.child
    data = CaseIdentified(
        case_id=case_id, municipality=request.municipality, child_ref=token,
        identified_month=f"{request.identified_on.year:04d}-{request.identified_on.month:02d}",
        reporter_agency=actor.agency,
        report_source=request.report_source, reported_by=actor.sub, age_band=rules.age_band(age),
        compulsory_school_age=rules.is_compulsory_school_age(age), sex=child.sex,
        community=child.community, school_status=child.school_status, sector=request.work.sector,
        hazardous=request.work.hazardous, worst_form=worst,
        employer_involved=request.work.employer_involved,
    )
    return Envelope.wrap(data, source=actor.source, subject=case_id,
                         correlationid=correlationid, causationid=causationid)


def _case_args(*, actor: Actor, request: IdentificationRequest, case_id: uuid.UUID, ref: str,
               linked: uuid.UUID | None, age: int, worst: bool, sealed: Any, envelope: Envelope) -> tuple:
    """Arguments $1.. of `_INSERT_CASE` and `_IDENTIFY_ONE_STATEMENT` (the same columns)."""
    child = request.child
    return (
        case_id, ref, linked, request.municipality, request.identified_on, request.report_source.value,
        actor.agency.value, actor.municipality, actor.sub, actor.channel, age,
        rules.age_band(age).value, rules.is_compulsory_school_age(age), child.sex.value,
        child.community.value, child.school_status.value, request.work.sector.value,
        request.work.activity, request.work.hazardous, worst, request.work.employer_involved,
        sealed.ciphertext, sealed.wrapped_key, sealed.master_key_id,
        envelope.id, envelope.type, actor.client_addr, Topic.case_events.value, envelope.to_json_bytes().decode(),
    )


# --- reading ------------------------------------------------------------------------------------------


async def _case_resource(conn: asyncpg.Connection, case: asyncpg.Record, **facts: Any) -> access.Resource:
    rows = await conn.fetch(f"select agency, municipality, open from {SCHEMA}.case_access where case_id = $1",
                            case["case_id"])
    return rules.case_resource(
        case_municipality=case["municipality"], reporter_agency=case["reporter_agency"],
        reporter_municipality=case["reporter_municipality"],
        holders={(r["agency"], r["municipality"]) for r in rows},
        open_referral_agencies=sorted({r["agency"] for r in rows if r["open"]}), **facts)


async def _authorise(conn: asyncpg.Connection, *, actor: Actor, case: asyncpg.Record,
                     action: str = "case.read", **facts: Any) -> access.Decision:
    return access.allowed(actor, action, await _case_resource(conn, case, **facts))


def _denied(actor: Actor, case_id: uuid.UUID, decision: access.Decision) -> Forbidden:
    return Forbidden(f"{actor.agency.value}/{actor.municipality} may not see case {case_id}: {decision.reason}")


async def get_case(intake: Intake, *, actor: Actor, case_id: uuid.UUID) -> CaseView:
    """The decrypted case for an authorised reader. Every attempt leaves an audit row."""
    denied: access.Decision | None = None
    async with intake.pool.acquire() as conn, conn.transaction():
        case = await conn.fetchrow(f"select * from {SCHEMA}.cases where case_id = $1", case_id)
        if case is None:
            await _audit(conn, actor=actor, action="case.read", outcome="not_found", case_id=case_id)
        elif not (decision := await _authorise(conn, actor=actor, case=case)):
            denied = decision
            await _audit(conn, actor=actor, action="case.read", outcome="denied", case_id=case_id)
        else:
            key = await conn.fetchrow(f"select wrapped_key, master_key_id from {SCHEMA}.case_keys "
                                      "where case_id = $1", case_id)
            linked = await _visible_link(conn, actor=actor, linked=case["linked_case_id"])
            history = await conn.fetch(
                f"select event_id, event_type, at, actor, agency, detail, note_ciphertext, confirmed_on "
                f"from {SCHEMA}.case_events "
                "where case_id = $1 order by at, event_id", case_id)
            offices = await conn.fetch(f"select distinct office_id from {SCHEMA}.case_access "
                                       "where case_id = $1 order by office_id", case_id)
            await _audit(conn, actor=actor, action="case.read", outcome="ok", case_id=case_id)
    if case is None:
        raise CaseNotFound(f"no case {case_id}")
    if denied is not None:
        raise _denied(actor, case_id, denied)
    personal = token = None
    if key is not None and case["pii_ciphertext"] is not None:
        raw = intake.cipher.open(case_id, ciphertext=case["pii_ciphertext"], wrapped_key=key["wrapped_key"],
                                 kid=key["master_key_id"])
        personal = PersonalView.model_validate(orjson.loads(raw))
        token = intake.cipher.token(case_id, key["wrapped_key"], key["master_key_id"])
    return CaseView(
        case_id=case_id, child_ref=token, linked_case_id=linked,
        repeat_identification=case["linked_case_id"] is not None,
        municipality=case["municipality"], status=case["status"], identified_on=case["identified_on"],
        report_source=case["report_source"], reporter_agency=case["reporter_agency"],
        reporter_municipality=case["reporter_municipality"], reported_by=case["reported_by"],
        age_at_identification=case["age_at_identification"], age_band=case["age_band"],
        compulsory_school_age=case["compulsory_school_age"], sex=case["sex"], community=case["community"],
        school_status=case["school_status"], sector=case["sector"], activity=case["activity"],
        hazardous=case["hazardous"], worst_form=case["worst_form"], employer_involved=case["employer_involved"],
        created_at=case["created_at"], updated_at=case["updated_at"], erased_at=case["erased_at"],
        personal=personal,
        history=[CaseHistoryItem(event_id=h["event_id"], type=h["event_type"], at=h["at"], by=h["actor"],
                                 agency=h["agency"], on=h["confirmed_on"], detail=_history_detail(intake, case_id, h, key["wrapped_key"] if key is not None else None))
                 for h in history],
        referred_to=[r["office_id"] for r in offices if r["office_id"]],
    )


def _history_detail(intake: Intake, case_id: uuid.UUID, row: asyncpg.Record, key: bytes | None) -> dict | None:
    detail = orjson.loads(row["detail"]) if row["detail"] else None
    if row["note_ciphertext"] is not None and key is not None:
        reason = intake.cipher.open_note(case_id, ciphertext=row["note_ciphertext"], wrapped_key=key).decode()
        detail = {**(detail or {}), "override_reason": reason}
    return detail


# --- follow-up events -----------------------------------------------------------------------------------


def _outcome_data(case: asyncpg.Record, actor: Actor, event: Any) -> tuple[EventData, dict[str, Any]]:
    """The published fact and the column changes for one follow-up event. The day the agency
    confirmed an outcome (`on`) is not published: intake keeps it in case_events.confirmed_on."""
    base = dict(case_id=case["case_id"], municipality=case["municipality"])
    if isinstance(event, ChildWithdrawnIn):
        return CaseChildWithdrawn(**base, confirmed_by_agency=actor.agency), {}
    if isinstance(event, SchoolEnrolledIn):
        return (CaseSchoolEnrolled(**base, confirmed_by_agency=actor.agency),
                {"school_status": SchoolStatus.enrolled_attending.value})
    if isinstance(event, ClosedIn):
        return (CaseClosed(**base, confirmed_by_agency=actor.agency, reason=event.reason),
                {"status": "closed"})
    assert isinstance(event, UpdatedIn)
    changes: dict[str, Any] = {}
    for name in ("school_status", "sector", "activity", "hazardous", "employer_involved"):
        value = getattr(event, name)
        if value is not None:
            changes[name] = value.value if hasattr(value, "value") else value
    if event.sector is not None and event.activity is not None:
        changes["worst_form"] = rules.is_worst_form(event.sector, event.activity)
    data = CaseUpdated(**base, school_status=event.school_status, sector=event.sector,
                       hazardous=event.hazardous, employer_involved=event.employer_involved,
                       updated_by_agency=actor.agency)
    return data, changes


def _event_actions(event: Any) -> list[str]:
    """The access-policy actions one follow-up event needs (shared/access_policy.yaml, case_events)."""
    changed: list[str] = []
    if isinstance(event, UpdatedIn):
        changed = [f for f in ("hazardous", "sector") if getattr(event, f) is not None]
    return access.policy().case_event_actions(event.type, changed)


async def _event_decision(conn: asyncpg.Connection, *, actor: Actor, case: asyncpg.Record,
                          event: Any) -> access.Decision:
    """Each event type has its own rule; an update of `hazardous` or the sector needs the
    reclassify rule too; closing looks at the open referrals of a worst-form case."""
    facts = {"worst_form": case["worst_form"], "override_reason": getattr(event, "override_reason", None)}
    resource = await _case_resource(conn, case, **facts)
    decision = access.Decision(False, "no rule", status=403)
    for action in _event_actions(event):
        decision = access.allowed(actor, action, resource)
        if not decision:
            return decision
    return decision


async def record_case_event(intake: Intake, *, actor: Actor, case_id: uuid.UUID, event: Any,
                            correlationid: str | None = None) -> CaseEventAccepted:
    """Child withdrawn / school enrolled / closed / updated: case row + audit + outbox, one transaction."""
    problem: IntakeError | None = None
    async with intake.pool.acquire() as conn, conn.transaction():
        case = await conn.fetchrow(f"select * from {SCHEMA}.cases where case_id = $1 for update", case_id)
        decision = None if case is None else await _event_decision(conn, actor=actor, case=case, event=event)
        if case is None:
            await _audit(conn, actor=actor, action="case.event", outcome="not_found", case_id=case_id)
            problem = CaseNotFound(f"no case {case_id}")
        elif decision is not None and decision.status == 403:
            await _audit(conn, actor=actor, action=f"case.event:{event.type}", outcome="denied", case_id=case_id)
            problem = Forbidden(f"{event.type!r} on case {case_id} refused: {decision.reason}")
        elif decision is not None and decision.status == 409 and case["status"] != "closed":
            await _audit(conn, actor=actor, action=f"case.event:{event.type}", outcome="conflict", case_id=case_id)
            problem = Conflict(f"case {case_id}: {decision.reason}")
        elif case["status"] == "closed":
            await _audit(conn, actor=actor, action="case.event", outcome="conflict", case_id=case_id)
            problem = Conflict(f"case {case_id} is closed; no further events can be recorded on it")
        elif hasattr(event, "on") and event.on < case["identified_on"]:
            raise Invalid(f"on: must not be before the case's identified_on ({case['identified_on']})")
        else:
            data, changes = _outcome_data(case, actor, event)
            envelope = Envelope.wrap(data, source=actor.source, subject=case_id, correlationid=correlationid)
            sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(changes, start=2))
            await conn.execute(
                f"update {SCHEMA}.cases set {sets + ', ' if sets else ''}updated_at = now() where case_id = $1",
                case_id, *changes.values())
            detail, note = None, None
            if decision is not None and decision.overridden:
                blocked = access.policy().action("case.close").blocked_while_open
                open_now = await conn.fetch(f"select distinct agency from {SCHEMA}.case_access "
                                            "where case_id = $1 and open", case_id)
                detail = orjson.dumps({"coordinator_override": True, "overrode_open_referrals": sorted(
                    r["agency"] for r in open_now if r["agency"] in blocked)}).decode()
                key = await conn.fetchval(f"select wrapped_key from {SCHEMA}.case_keys where case_id = $1", case_id)
                if key is not None:  # an erased case keeps no free text
                    note = intake.cipher.seal_note(case_id, wrapped_key=key,
                                                   plaintext=event.override_reason.encode())
            await conn.execute(
                f"insert into {SCHEMA}.case_events(event_id, case_id, event_type, actor, agency, detail, "
                "note_ciphertext, confirmed_on) values($1,$2,$3,$4,$5,$6::jsonb,$7,$8)", envelope.id, case_id,
                envelope.type, actor.sub, actor.agency.value, detail, note, getattr(event, "on", None))
            action = f"case.event:{envelope.type}" + (":override" if detail else "")
            await _audit(conn, actor=actor, action=action, outcome="ok", case_id=case_id)
            await outbox.append(conn, schema=SCHEMA, topic=Topic.case_events, envelope=envelope)
            status = changes.get("status", case["status"])
    if problem is not None:
        raise problem
    intake.on_commit()
    return CaseEventAccepted(case_id=case_id, event_id=envelope.id, type=envelope.type, status=status)


# --- referral holders (from clms.referral-events) ---------------------------------------------------------


async def apply_referral_event(intake: Intake, *, envelope: Envelope) -> bool:
    """Learn which agency offices hold a referral for a case. Idempotent on the event id."""
    async with intake.pool.acquire() as conn, conn.transaction():
        if not await outbox.claim(conn, schema=SCHEMA, consumer=REFERRAL_ACCESS_CONSUMER, envelope=envelope):
            return False
        data = envelope.data
        if isinstance(data, ReferralCreated):
            await conn.execute(
                f"insert into {SCHEMA}.case_access(case_id, agency, municipality, referral_id, office_id) "
                "values($1, $2, $3, $4, $5) on conflict do nothing",
                data.case_id, data.agency.value, data.municipality, data.referral_id, data.office_id)
        elif isinstance(data, (ReferralCompleted, ReferralDeclined, ReferralClosed)):
            # no longer open (the office keeps read access to the case it worked on)
            await conn.execute(
                f"update {SCHEMA}.case_access set open = false, closed_at = now() "
                "where referral_id = $1 and open", data.referral_id)
    return True


# --- inbound CloudEvents (clms.agency-inbound) --------------------------------------------------------------


def parse_inbound(raw: bytes | None, *, gate: InboundGate) -> tuple[InboundEnvelope, IdentificationRequest]:
    """Verify who sent an inbound message (JWS), decrypt its personal part (JWE) and validate it
    exactly as the HTTP path validates a body; raise `InboundRejected` naming the field (never
    a value)."""
    if raw is None:
        raise InboundRejected("invalid_message", "the message has no value")
    obj = gate.verify(raw)
    if obj.get("type") != IDENTIFICATION_SUBMITTED:
        kind = obj.get("type")
        raise InboundRejected(
            "unknown_type", f"type: {kind if isinstance(kind, str) and len(kind) < 64 else '(not a type name)'!r} "
                            f"is not accepted on the inbound topic; expected {IDENTIFICATION_SUBMITTED!r}")
    try:
        env = InboundEnvelope.model_validate(obj)
    except ValidationError as exc:
        raise InboundRejected("invalid_envelope", describe_validation_error(exc)) from None
    gate.check_reporter(agency=env.agency.value, municipality=env.municipality, reportedby=env.reportedby)
    data = gate.open_data(env.data)
    try:
        request = IdentificationRequest.model_validate(data)
    except ValidationError as exc:
        raise InboundRejected("invalid_identification", describe_validation_error(exc, prefix="data.")) from None
    return env, request


async def submit_inbound(intake: Intake, *, raw: bytes | None) -> Identified:
    env, request = parse_inbound(raw, gate=intake.inbound or InboundGate.build(intake.settings))
    actor = Actor(sub=env.reportedby or f"{env.agency.value}.{env.municipality}.system", agency=env.agency,
                  municipality=env.municipality, roles=("reporter",), channel="inbound")
    correlation = env.correlationid or (env.id if len(env.id) <= 100 else str(env.dedupe_id))
    return await identify(
        intake, actor=actor, request=request, correlationid=correlation,
        causationid=env.id if len(env.id) <= 100 else str(env.dedupe_id),
        case_id=uuid.uuid5(env.dedupe_id, "case"), inbox_id=env.dedupe_id,
    )


# --- crypto-erasure ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Erasure:
    case_id: uuid.UUID
    erased_at: datetime
    already: bool


async def erase_case(intake: Intake | asyncpg.Pool, *, case_id: uuid.UUID, actor: Actor) -> Erasure:
    """Erase one case's identity and pseudonyms, in one transaction:

    - delete its data key (crypto-erasure: the ciphertext, also any copy of it in an older backup,
      no longer opens, and the per-case token derived from that key can no longer be computed),
      and drop the ciphertext;
    - drop the cross-case pseudonym (`cases.child_ref`, the HMAC of names and birth year that
      links cases of one child) and every link to or from the case: cases that linked to it link
      to the earliest remaining earlier case of the same child, or to none;
    - rewrite intake's outbox (the durable event log `make run` replays into an empty broker): the
      case's `case.identified` keeps its facts but its child_ref becomes ERASED_CHILD_REF, and no
      row keeps a linked_case_id naming the case (rows written before per-case tokens carried it);
    - delete the Idempotency-Key answers of the case and unname it in other answers.

    The case's non-personal facts (municipality, sector, age band, history, audit) stay for the
    statistics and the legal trail. What erasure cannot reach (broker records, WAL, backups):
    README, Privacy."""
    pool = intake.pool if isinstance(intake, Intake) else intake
    cid = str(case_id)
    async with pool.acquire() as conn, conn.transaction():
        case = await conn.fetchrow(f"select case_id, erased_at from {SCHEMA}.cases where case_id = $1 for update",
                                   case_id)
        if case is None:
            await _audit(conn, actor=actor, action="case.erase", outcome="not_found", case_id=case_id)
            problem: Exception | None = CaseNotFound(f"no case {case_id}")
        else:
            problem = None
            already = case["erased_at"] is not None
            await conn.execute(f"delete from {SCHEMA}.case_keys where case_id = $1", case_id)
            erased_at = await conn.fetchval(
                f"update {SCHEMA}.cases set pii_ciphertext = null, child_ref = null, linked_case_id = null, "
                "erased_at = coalesce(erased_at, now()), updated_at = now() where case_id = $1 returning erased_at",
                case_id)
            await conn.execute(
                f"""update {SCHEMA}.cases c set linked_case_id = (
                        select f.case_id from {SCHEMA}.cases f
                        where f.child_ref = c.child_ref and (f.created_at, f.case_id) < (c.created_at, c.case_id)
                        order by f.created_at, f.case_id limit 1)
                    where c.linked_case_id = $1""", case_id)
            await conn.execute(
                f"""update {SCHEMA}.outbox set envelope = jsonb_set(jsonb_set(envelope, '{{data,child_ref}}',
                        to_jsonb($2::text)), '{{data,linked_case_id}}', 'null'::jsonb)
                    where key = $1 and event_type = 'case.identified'""", cid, ERASED_CHILD_REF)
            await conn.execute(
                f"""update {SCHEMA}.outbox set envelope = jsonb_set(envelope, '{{data,linked_case_id}}', 'null'::jsonb)
                    where event_type = 'case.identified' and envelope #>> '{{data,linked_case_id}}' = $1""", cid)
            await conn.execute(f"delete from {SCHEMA}.idempotency_keys where case_id = $1", case_id)
            await conn.execute(
                f"""update {SCHEMA}.idempotency_keys set response = jsonb_set(response, '{{linked_case_id}}', 'null'::jsonb)
                    where response ->> 'linked_case_id' = $1""", cid)
            await conn.execute(f"update {SCHEMA}.case_events set note_ciphertext = null "
                               "where case_id = $1 and note_ciphertext is not null", case_id)
            await _audit(conn, actor=actor, action="case.erase", outcome="ok", case_id=case_id)
    if problem is not None:
        raise problem
    return Erasure(case_id=case_id, erased_at=erased_at, already=already)


# --- master key rotation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rotation:
    newest: str  # the kid every data key is now wrapped with
    rewrapped: int  # data keys re-wrapped by this run
    by_kid: dict[str, int]  # data keys per master key id after the run
    unknown: dict[str, int]  # data keys wrapped by a kid not configured here (cannot be re-wrapped)


async def key_status(pool: asyncpg.Pool, cipher: CaseCipher) -> Rotation:
    rows = await pool.fetch(f"select master_key_id, count(*) as n from {SCHEMA}.case_keys group by 1 order by 1")
    by_kid = {r["master_key_id"]: r["n"] for r in rows}
    return Rotation(newest=cipher.master_key_id, rewrapped=0, by_kid=by_kid,
                    unknown={k: n for k, n in by_kid.items() if k not in cipher.kids})


async def rotate_keys(pool: asyncpg.Pool, cipher: CaseCipher, *, batch: int = 200) -> Rotation:
    """Re-wrap every data key not wrapped by the newest master key, online: short transactions of
    `batch` rows, each row locked (`skip locked`) only while it is re-wrapped, so identifications,
    reads and erasures go on meanwhile (they unwrap with whichever configured kid a row names).
    An erasure that deleted a key meanwhile simply leaves nothing to re-wrap."""
    old = [k for k in cipher.kids if k != cipher.master_key_id]
    done = 0
    while old:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"select case_id, wrapped_key, master_key_id from {SCHEMA}.case_keys "
                "where master_key_id = any($1::text[]) order by case_id limit $2 for update skip locked", old, batch)
            for r in rows:
                wrapped, kid = cipher.rewrap(r["case_id"], r["wrapped_key"], r["master_key_id"])
                await conn.execute(f"update {SCHEMA}.case_keys set wrapped_key = $2, master_key_id = $3 "
                                   "where case_id = $1", r["case_id"], wrapped, kid)
        done += len(rows)
        if len(rows) < batch:
            break
    status = await key_status(pool, cipher)
    return Rotation(newest=status.newest, rewrapped=done, by_kid=status.by_kid, unknown=status.unknown)


__all__ = [
    "Actor", "Intake", "identify", "get_case", "record_case_event", "apply_referral_event",
    "parse_inbound", "submit_inbound", "erase_case", "IntakeError", "Forbidden", "CaseNotFound",
    "Conflict", "Invalid", "IdempotencyKeyReused", "InboundRejected", "rotate_keys", "key_status", "Rotation",
]
