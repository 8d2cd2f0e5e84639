"""Intake use cases (keyword-only functions). One transaction per use case: the state change, its
audit row and its outbox row commit together or not at all.

Used by the HTTP views, the clms.agency-inbound consumer (same `identify` path as HTTP) and the
`clms erase` command.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError

from shared import access, outbox
from shared.errors import Conflict, Forbidden, Invalid, NotFound
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
from shared.topics import Topic
from services.intake import rules, store
from services.intake.crypto import ERASED_CHILD_REF, CaseCipher
from services.intake.deps import SCHEMA, Deps
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

REFERRAL_ACCESS_CONSUMER = "intake.referral-access"
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


class CaseNotFound(NotFound):
    """No case with that id (404)."""


class IdempotencyKeyReused(Invalid):
    """The Idempotency-Key came with a different body before (422)."""


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
        n = await store.delete_old_idempotency_rows(pool, older_than_s=older_than_s, batch=batch)
        total += n
        if n < batch:
            return total


# --- identification -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identified:
    answer: IdentificationAccepted
    replayed: bool = False  # the first answer of an Idempotency-Key or an inbound event seen before


@dataclass(frozen=True, slots=True)
class _NewCase:
    """What an identification becomes before it is stored: the case id, the child's cross-case
    pseudonym, the derived facts and the sealed personal data."""

    case_id: uuid.UUID
    ref: str
    age: int
    worst: bool
    sealed: Any


async def identify(
    deps: Deps,
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
    new = _new_case(deps, request=request, case_id=case_id or uuid.uuid4())
    event = _identified_event(actor=actor, request=request, new=new, correlationid=correlationid,
                              causationid=causationid)
    if inbox_id is None and idempotency_key is None:
        result = await _identify_in_one_statement(deps, actor=actor, request=request, new=new, event=event)
    else:
        result = await _identify_once(deps, actor=actor, request=request, new=new, event=event,
                                      idempotency_key=idempotency_key, inbox_id=inbox_id)
    linked = result.answer.linked_case_id
    if linked is not None and not await _may_read(deps, actor=actor, case_id=linked):
        # No identity oracle: a reporter learns of an earlier case of the child only when they
        # may read that case (the link itself stays on the case and its event for the agencies).
        result = Identified(result.answer.model_copy(update={"linked_case_id": None}), replayed=result.replayed)
    return result


def _new_case(deps: Deps, *, request: IdentificationRequest, case_id: uuid.UUID) -> _NewCase:
    ref = rules.child_ref(deps.child_ref_key, given_name=request.child.given_name,
                          family_name=request.child.family_name, year_of_birth=request.birth_year)
    return _NewCase(case_id=case_id, ref=ref, age=request.age,
                    worst=rules.is_worst_form(request.work.sector, request.work.activity),
                    sealed=deps.cipher.seal(case_id, orjson.dumps(request.personal())))


async def _may_read(deps: Deps, *, actor: Actor, case_id: uuid.UUID) -> bool:
    async with deps.pool.acquire() as conn:
        case = await store.case_scope(conn, case_id)
        return case is not None and bool(await _authorise(conn, actor=actor, case=case))


async def _identify_in_one_statement(deps: Deps, *, actor: Actor, request: IdentificationRequest, new: _NewCase,
                                     event: Envelope) -> Identified:
    """The common case: lock, link and the five rows in one statement (store.link_and_insert_case)."""
    async with deps.pool.acquire() as conn:
        linked = await store.link_and_insert_case(
            conn, _case_args(actor=actor, request=request, new=new, linked=None, envelope=event))
        deps.on_commit()
        visible = await _visible_link(conn, actor=actor, linked=linked)
    return Identified(IdentificationAccepted(case_id=new.case_id, child_ref=new.sealed.token, linked_case_id=visible,
                                             repeat_identification=linked is not None))


async def _identify_once(deps: Deps, *, actor: Actor, request: IdentificationRequest, new: _NewCase,
                         event: Envelope, idempotency_key: str | None, inbox_id: uuid.UUID | None) -> Identified:
    """An inbound event (deduplicated on its id) or a request with an Idempotency-Key (its first
    answer is kept): a retry returns the first answer and records nothing new."""
    async with deps.pool.acquire() as conn, conn.transaction():
        if inbox_id is not None and not await store.claim_inbound(conn, inbox_id=inbox_id,
                                                                  event_type=IDENTIFICATION_SUBMITTED):
            return await _inbound_seen_before(deps, conn, actor=actor, case_id=new.case_id)
        linked = await store.first_case_of(conn, new.ref)  # serialised per child: the second of two links
        answer = IdentificationAccepted(case_id=new.case_id, child_ref=new.sealed.token,
                                        repeat_identification=linked is not None,
                                        linked_case_id=await _visible_link(conn, actor=actor, linked=linked))
        if idempotency_key is not None:
            previous = await _first_answer_of_key(deps, conn, actor=actor, request=request, key=idempotency_key,
                                                  answer=answer)
            if previous is not None:
                return Identified(previous, replayed=True)
        await store.insert_case(conn, _case_args(actor=actor, request=request, new=new, linked=linked, envelope=event))
    deps.on_commit()
    return Identified(answer)


async def _inbound_seen_before(deps: Deps, conn: asyncpg.Connection, *, actor: Actor,
                               case_id: uuid.UUID) -> Identified:
    """The answer to an inbound event applied before: its case (the token gone once erased)."""
    row = await store.case_link_and_key(conn, case_id)
    token = (deps.cipher.token(case_id, row["wrapped_key"], row["master_key_id"])
             if row is not None and row["wrapped_key"] is not None else ERASED_CHILD_REF)
    linked = row["linked_case_id"] if row is not None else None
    return Identified(IdentificationAccepted(
        case_id=case_id, child_ref=token, repeat_identification=linked is not None,
        linked_case_id=await _visible_link(conn, actor=actor, linked=linked)), replayed=True)


async def _first_answer_of_key(deps: Deps, conn: asyncpg.Connection, *, actor: Actor,
                               request: IdentificationRequest, key: str,
                               answer: IdentificationAccepted) -> IdentificationAccepted | None:
    """Keep `answer` for the caller's Idempotency-Key and return None; or, when the key was used
    before, the first answer (same body) or IdempotencyKeyReused (another body)."""
    digest = request_hash(deps.idempotency_key, request)  # only a keyed request needs it
    if await store.remember_answer(conn, subject=actor.sub, key=key, request_hash=digest, case_id=answer.case_id,
                                   response=answer.model_dump_json()):
        return None
    first = await store.first_answer(conn, subject=actor.sub, key=key)
    if first["request_hash"] != digest:
        await store.add_audit_row(conn, actor=actor, action="case.create", outcome="conflict", case_id=None)
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was already used for a different identification; "
            "send a new key for a new identification, or resend the first body unchanged")
    previous = IdentificationAccepted.model_validate_json(first["response"])
    await store.add_audit_row(conn, actor=actor, action="case.create", outcome="replayed", case_id=previous.case_id)
    return previous


async def _visible_link(conn: asyncpg.Connection, *, actor: Actor, linked: uuid.UUID | None) -> uuid.UUID | None:
    """The linked case id when this actor may read that case too, else None: a link tells that
    two cases are one child, so it is shown only to a reader allowed to see both."""
    if linked is None:
        return None
    case = await store.case_scope(conn, linked)
    return linked if case is not None and await _authorise(conn, actor=actor, case=case) else None


def _identified_event(*, actor: Actor, request: IdentificationRequest, new: _NewCase, correlationid: str | None,
                      causationid: str | None) -> Envelope:
    """The published `case.identified`: a per-case token and categories only (no link to other
    cases, the month rather than the day, no activity code: shared.events.CaseIdentified)."""
    child = request.child
    data = CaseIdentified(
        case_id=new.case_id, municipality=request.municipality, child_ref=new.sealed.token,
        identified_month=f"{request.identified_on.year:04d}-{request.identified_on.month:02d}",
        reporter_agency=actor.agency,
        report_source=request.report_source, reported_by=actor.sub, age_band=rules.age_band(new.age),
        compulsory_school_age=rules.is_compulsory_school_age(new.age), sex=child.sex,
        community=child.community, school_status=child.school_status, sector=request.work.sector,
        hazardous=request.work.hazardous, worst_form=new.worst,
        employer_involved=request.work.employer_involved,
    )
    return Envelope.wrap(data, source=actor.source, subject=new.case_id,
                         correlationid=correlationid, causationid=causationid)


def _case_args(*, actor: Actor, request: IdentificationRequest, new: _NewCase, linked: uuid.UUID | None,
               envelope: Envelope) -> tuple:
    """Arguments $1.. of store.insert_case and store.link_and_insert_case (the same columns)."""
    child, age, sealed = request.child, new.age, new.sealed
    return (
        new.case_id, new.ref, linked, request.municipality, request.identified_on, request.report_source.value,
        actor.agency.value, actor.municipality, actor.sub, actor.channel, age,
        rules.age_band(age).value, rules.is_compulsory_school_age(age), child.sex.value,
        child.community.value, child.school_status.value, request.work.sector.value,
        request.work.activity, request.work.hazardous, new.worst, request.work.employer_involved,
        sealed.ciphertext, sealed.wrapped_key, sealed.master_key_id,
        envelope.id, envelope.type, actor.client_addr, Topic.case_events.value, envelope.to_json_bytes().decode(),
    )


# --- reading ------------------------------------------------------------------------------------------


async def _case_resource(conn: asyncpg.Connection, case: asyncpg.Record, **facts: Any) -> access.Resource:
    rows = await store.referral_holders(conn, case["case_id"])
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


@dataclass(frozen=True, slots=True)
class _CaseRead:
    """What an authorised read found in the database (decrypted afterwards, outside the transaction)."""

    case: asyncpg.Record
    key: asyncpg.Record | None
    linked: uuid.UUID | None
    history: list[asyncpg.Record]
    offices: list[asyncpg.Record]


async def get_case(deps: Deps, *, actor: Actor, case_id: uuid.UUID) -> CaseView:
    """The decrypted case for an authorised reader. Every attempt leaves an audit row."""
    denied: access.Decision | None = None
    found: _CaseRead | None = None
    async with deps.pool.acquire() as conn, conn.transaction():
        case = await store.case_row(conn, case_id)
        if case is None:
            await store.add_audit_row(conn, actor=actor, action="case.read", outcome="not_found", case_id=case_id)
        elif not (decision := await _authorise(conn, actor=actor, case=case)):
            denied = decision
            await store.add_audit_row(conn, actor=actor, action="case.read", outcome="denied", case_id=case_id)
        else:
            found = _CaseRead(case=case, key=await store.case_key(conn, case_id),
                              linked=await _visible_link(conn, actor=actor, linked=case["linked_case_id"]),
                              history=await store.case_history(conn, case_id),
                              offices=await store.referred_offices(conn, case_id))
            await store.add_audit_row(conn, actor=actor, action="case.read", outcome="ok", case_id=case_id)
    if case is None:
        raise CaseNotFound(f"no case {case_id}")
    if denied is not None:
        raise _denied(actor, case_id, denied)
    assert found is not None
    return _case_view(deps, case_id, found)


def _case_view(deps: Deps, case_id: uuid.UUID, found: _CaseRead) -> CaseView:
    case, key = found.case, found.key
    personal = token = None
    if key is not None and case["pii_ciphertext"] is not None:
        raw = deps.cipher.open(case_id, ciphertext=case["pii_ciphertext"], wrapped_key=key["wrapped_key"],
                               kid=key["master_key_id"])
        personal = PersonalView.model_validate(orjson.loads(raw))
        token = deps.cipher.token(case_id, key["wrapped_key"], key["master_key_id"])
    wrapped = key["wrapped_key"] if key is not None else None
    return CaseView(
        case_id=case_id, child_ref=token, linked_case_id=found.linked,
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
                                 agency=h["agency"], on=h["confirmed_on"],
                                 detail=_history_detail(deps, case_id, h, wrapped))
                 for h in found.history],
        referred_to=[r["office_id"] for r in found.offices if r["office_id"]],
    )


def _history_detail(deps: Deps, case_id: uuid.UUID, row: asyncpg.Record, key: bytes | None) -> dict | None:
    detail = orjson.loads(row["detail"]) if row["detail"] else None
    if row["note_ciphertext"] is not None and key is not None:
        reason = deps.cipher.open_note(case_id, ciphertext=row["note_ciphertext"], wrapped_key=key).decode()
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
async def record_case_event(deps: Deps, *, actor: Actor, case_id: uuid.UUID, event: Any,
                            correlationid: str | None = None) -> CaseEventAccepted:
    """Child withdrawn / school enrolled / closed / updated: case row + audit + outbox, one transaction."""
    problem: Exception | None = None
    async with deps.pool.acquire() as conn, conn.transaction():
        case = await store.case_row(conn, case_id, for_update=True)
        decision = None if case is None else await _event_decision(conn, actor=actor, case=case, event=event)
        problem = await _refusal(conn, actor=actor, case_id=case_id, case=case, decision=decision, event=event)
        if problem is None:
            assert case is not None
            accepted = await _record_outcome(deps, conn, actor=actor, case=case, decision=decision, event=event,
                                             correlationid=correlationid)
    if problem is not None:
        raise problem
    deps.on_commit()
    return accepted


async def _refusal(conn: asyncpg.Connection, *, actor: Actor, case_id: uuid.UUID, case: asyncpg.Record | None,
                   decision: access.Decision | None, event: Any) -> Exception | None:
    """Why the event cannot be recorded on the case (after auditing the refusal), or None."""
    if case is None:
        await store.add_audit_row(conn, actor=actor, action="case.event", outcome="not_found", case_id=case_id)
        return CaseNotFound(f"no case {case_id}")
    if decision is not None and decision.status == 403:
        await store.add_audit_row(conn, actor=actor, action=f"case.event:{event.type}", outcome="denied",
                                  case_id=case_id)
        return Forbidden(f"{event.type!r} on case {case_id} refused: {decision.reason}")
    if decision is not None and decision.status == 409 and case["status"] != "closed":
        await store.add_audit_row(conn, actor=actor, action=f"case.event:{event.type}", outcome="conflict",
                                  case_id=case_id)
        return Conflict(f"case {case_id}: {decision.reason}")
    if case["status"] == "closed":
        await store.add_audit_row(conn, actor=actor, action="case.event", outcome="conflict", case_id=case_id)
        return Conflict(f"case {case_id} is closed; no further events can be recorded on it")
    if hasattr(event, "on") and event.on < case["identified_on"]:
        raise Invalid(f"on: must not be before the case's identified_on ({case['identified_on']})")
    return None


async def _record_outcome(deps: Deps, conn: asyncpg.Connection, *, actor: Actor, case: asyncpg.Record,
                          decision: access.Decision | None, event: Any, correlationid: str | None) -> CaseEventAccepted:
    """The case row's changes, its history row (with the coordinator's override, its reason
    encrypted), the audit row and the outbox row."""
    case_id = case["case_id"]
    data, changes = _outcome_data(case, actor, event)
    envelope = Envelope.wrap(data, source=actor.source, subject=case_id, correlationid=correlationid)
    await store.update_case(conn, case_id, changes)
    detail, note = None, None
    if decision is not None and decision.overridden:
        blocked = access.policy().action("case.close").blocked_while_open
        open_now = await store.open_referral_agencies(conn, case_id)
        detail = orjson.dumps({"coordinator_override": True, "overrode_open_referrals": sorted(
            agency for agency in open_now if agency in blocked)}).decode()
        key = await store.wrapped_key(conn, case_id)
        if key is not None:  # an erased case keeps no free text
            note = deps.cipher.seal_note(case_id, wrapped_key=key, plaintext=event.override_reason.encode())
    await store.add_case_event(conn, event_id=envelope.id, case_id=case_id, event_type=envelope.type,
                               actor=actor.sub, agency=actor.agency.value, detail=detail, note=note,
                               confirmed_on=getattr(event, "on", None))
    action = f"case.event:{envelope.type}" + (":override" if detail else "")
    await store.add_audit_row(conn, actor=actor, action=action, outcome="ok", case_id=case_id)
    await outbox.append(conn, schema=SCHEMA, topic=Topic.case_events, envelope=envelope)
    return CaseEventAccepted(case_id=case_id, event_id=envelope.id, type=envelope.type,
                             status=changes.get("status", case["status"]))


# --- referral holders (from clms.referral-events) ---------------------------------------------------------


async def apply_referral_event(deps: Deps, *, envelope: Envelope) -> bool:
    """Learn which agency offices hold a referral for a case. Idempotent on the event id."""
    return await apply_referral_events(deps, envelopes=[envelope]) == 1


async def apply_referral_events(deps: Deps, *, envelopes: list[Envelope]) -> int:
    """`apply_referral_event` for several events in one transaction (in order; each claimed by
    its id, so a redelivered one changes nothing): all of them take effect or none. Returns how
    many were new."""
    applied = 0
    async with deps.pool.acquire() as conn, conn.transaction():
        for envelope in envelopes:
            if await outbox.claim(conn, schema=SCHEMA, consumer=REFERRAL_ACCESS_CONSUMER, envelope=envelope):
                await _apply_referral_data(conn, envelope.data)
                applied += 1
    return applied


async def _apply_referral_data(conn: asyncpg.Connection, data: EventData) -> None:
    if isinstance(data, ReferralCreated):
        await store.add_referral_holder(conn, case_id=data.case_id, agency=data.agency.value,
                                        municipality=data.municipality, referral_id=data.referral_id,
                                        office_id=data.office_id)
    elif isinstance(data, (ReferralCompleted, ReferralDeclined, ReferralClosed)):
        await store.close_referral(conn, data.referral_id)


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


async def submit_inbound(deps: Deps, *, raw: bytes | None) -> Identified:
    env, request = parse_inbound(raw, gate=deps.inbound or InboundGate.build(deps.settings))
    actor = Actor(sub=env.reportedby or f"{env.agency.value}.{env.municipality}.system", agency=env.agency,
                  municipality=env.municipality, roles=("reporter",), channel="inbound")
    correlation = env.correlationid or (env.id if len(env.id) <= 100 else str(env.dedupe_id))
    return await identify(
        deps, actor=actor, request=request, correlationid=correlation,
        causationid=env.id if len(env.id) <= 100 else str(env.dedupe_id),
        case_id=uuid.uuid5(env.dedupe_id, "case"), inbox_id=env.dedupe_id,
    )


# --- crypto-erasure ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Erasure:
    case_id: uuid.UUID
    erased_at: datetime
    already: bool


async def erase_case(deps: Deps | asyncpg.Pool, *, case_id: uuid.UUID, actor: Actor) -> Erasure:
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
    pool = deps.pool if isinstance(deps, Deps) else deps
    async with pool.acquire() as conn, conn.transaction():
        case = await store.lock_case_for_erasure(conn, case_id)
        if case is None:
            await store.add_audit_row(conn, actor=actor, action="case.erase", outcome="not_found", case_id=case_id)
        else:
            already = case["erased_at"] is not None
            await store.delete_case_key(conn, case_id)
            erased_at = await store.drop_identity(conn, case_id)
            await store.relink_cases_linked_to(conn, case_id)
            await store.unname_in_outbox(conn, str(case_id), erased_child_ref=ERASED_CHILD_REF)
            await store.forget_idempotency_answers(conn, case_id)
            await store.drop_notes(conn, case_id)
            await store.add_audit_row(conn, actor=actor, action="case.erase", outcome="ok", case_id=case_id)
    if case is None:
        raise CaseNotFound(f"no case {case_id}")
    return Erasure(case_id=case_id, erased_at=erased_at, already=already)


# --- master key rotation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rotation:
    newest: str  # the kid every data key is now wrapped with
    rewrapped: int  # data keys re-wrapped by this run
    by_kid: dict[str, int]  # data keys per master key id after the run
    unknown: dict[str, int]  # data keys wrapped by a kid not configured here (cannot be re-wrapped)


async def key_status(pool: asyncpg.Pool, cipher: CaseCipher) -> Rotation:
    by_kid = await store.data_keys_by_master_key(pool)
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
            rows = await store.lock_keys_to_rewrap(conn, kids=old, batch=batch)
            for r in rows:
                wrapped, kid = cipher.rewrap(r["case_id"], r["wrapped_key"], r["master_key_id"])
                await store.store_rewrapped_key(conn, r["case_id"], wrapped, kid)
        done += len(rows)
        if len(rows) < batch:
            break
    status = await key_status(pool, cipher)
    return Rotation(newest=status.newest, rewrapped=done, by_kid=status.by_kid, unknown=status.unknown)


__all__ = [
    "Actor", "Deps", "identify", "get_case", "record_case_event", "apply_referral_event", "apply_referral_events",
    "parse_inbound", "submit_inbound", "erase_case", "CaseNotFound", "IdempotencyKeyReused",
    "InboundRejected", "rotate_keys", "key_status", "Rotation",
]
