"""Use cases of the referral service. Each state change and its outbox rows commit together.

- `apply_case_event(s)`: case events from clms.case-events (inbox claim + referrals + outbox).
- `list_referrals` / `get_referral`: what a caseworker or coordinator may see.
- `act`: acknowledge / accept / decline / complete (row lock, legal transition, history, outbox).
- `escalate_due`: referrals past their deadline still waiting for an answer -> overdue + escalated.

They raise `shared.errors` (`NotFound`, `Forbidden`, `Conflict` with the current status,
`Invalid`), which `shared.web` turns into the HTTP answer; the SQL is in `store.py`, the rules in
`rules.py`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.referral import rules, store
from services.referral.deps import Deps
from services.referral.rules import Action, Filters
from services.referral.store import SCHEMA  # noqa: F401 - the schema the use cases write
from shared.auth import Claims
from shared.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError
from shared.events import (
    AgencyType,
    CaseClosed,
    CaseIdentified,
    DeclineReason,
    Envelope,
    EventData,
    ReferralAccepted,
    ReferralAcknowledged,
    ReferralClosed,
    ReferralCompleted,
    ReferralCreated,
    ReferralDeclined,
    ReferralEscalated,
    ReferralOutcome,
    ReferralOverdue,
    ReferralStatus,
)

SERVICE = "referral"  # envelope source and actor of what the service itself does
CONSUMER = "referral.case-events"  # inbox consumer name

audit = logging.getLogger("clms.referral.audit")


class UnexpectedEvent(Invalid):
    """An event that does not belong on the topic (dead-lettered by the worker)."""


# --- consuming case events ---------------------------------------------------------------------


async def apply_case_event(deps: Deps, *, envelope: Envelope) -> list[uuid.UUID]:
    """Apply one event from clms.case-events; returns the referrals opened (none if seen before).

    `case.identified` opens one referral per target agency: the inbox claim, the referral rows,
    their history rows and their `referral.created` outbox rows are ONE statement, so ONE
    transaction: either the event is applied with everything it causes, or not at all. A case
    that already has a referral to an agency gets no second one. `case.closed` closes the
    case's open referrals; the other case.* events are recorded as applied and change nothing.
    Anything else raises `UnexpectedEvent` (the worker dead-letters it).
    """
    return (await apply_case_events(deps, envelopes=[envelope]))[0]


async def apply_case_events(deps: Deps, *, envelopes: list[Envelope]) -> list[list[uuid.UUID]]:
    """Apply several case events in one transaction (one pipelined round trip), in order.

    All or nothing: an error leaves none of them applied (the worker then applies them one by
    one, so only the bad one is dead-lettered). Returns the referrals opened per event.
    """
    for env in envelopes:
        if not env.type.startswith("case."):
            raise UnexpectedEvent(f"type: {env.type} does not belong on case-events")
    now = deps.clock()
    openings = [_opening(deps.rules, env) for env in envelopes]
    async with deps.pool.acquire() as conn, conn.transaction():
        rows = await store.claim_and_open(conn, openings, consumer=CONSUMER, actor=SERVICE,
                                          rules_version=deps.rules.version, now=now)
        closed = 0
        for env, row in zip(envelopes, rows, strict=True):
            if isinstance(env.data, CaseClosed) and row["claimed"]:
                closed += await _close_with_case(conn, env, now)
    opened = [list(row["opened"]) for row in rows]
    for o, ids in zip(openings, opened, strict=True):
        by_id = {e.data.referral_id: e.data for e in o.created}
        for rid in ids:
            deps.on_opened(by_id[rid].agency.value, by_id[rid].priority)
    if closed or any(opened):
        deps.wake_relay()
    return opened


def _opening(ruleset: rules.RuleSet, envelope: Envelope) -> store.Opening:
    """What one case event opens: a `case.identified` is routed, one `referral.created` per
    agency; any other case event opens nothing (it is only claimed)."""
    case = envelope.data
    if not isinstance(case, CaseIdentified):
        return store.Opening(envelope=envelope, decisions=(), created=())
    decisions = ruleset.route(case, at=envelope.time)
    created = [
        envelope.follow(ReferralCreated(
            referral_id=rules.referral_id_for(envelope.id, d.agency.value), case_id=case.case_id,
            municipality=case.municipality, agency=d.agency, office_id=d.office_id, rule_id=d.rule_id,
            rule_version=d.rule_version, priority=d.priority, deadline=d.deadline,
            legal_basis=d.legal_basis, age_band=case.age_band, sector=case.sector,
            reported_by=case.reported_by,
        ), source=SERVICE)
        for d in decisions
    ]
    return store.Opening(envelope=envelope, decisions=decisions, created=created)


async def _close_with_case(conn: asyncpg.Connection, envelope: Envelope, now: datetime) -> int:
    """The case closed: every referral of it still open closes too (status `closed`, history,
    `referral.closed` in the outbox), so none of them runs into a deadline and an escalation.
    Runs in the transaction that claims the case.closed event."""
    case: CaseClosed = envelope.data  # type: ignore[assignment]
    rows = await store.close_open_referrals_of_case(conn, case.case_id, now)
    for r in rows:
        event = envelope.follow(ReferralClosed(
            referral_id=r["referral_id"], case_id=case.case_id, municipality=r["municipality"],
            agency=AgencyType(r["agency"]), office_id=r["office_id"],
            from_status=ReferralStatus(r["from_status"]), to_status=ReferralStatus.closed,
            case_reason=case.reason,
        ), source=SERVICE)
        await store.add_history(conn, r["referral_id"], actor=envelope.source, action="closed",
                                from_status=r["from_status"], to_status=ReferralStatus.closed,
                                event_id=event.id, detail={"case_reason": case.reason.value}, at=now)
        await store.publish(conn, event)
    return len(rows)


# --- reading ----------------------------------------------------------------------------------------


async def list_referrals(deps: Deps, *, claims: Claims, filters: Filters) -> tuple[list[dict], Filters]:
    """The referrals the caller may see (as the API shows them) and the filters as narrowed to
    the caller's scope; `Forbidden` when the filters ask for more than that."""
    f = rules.scoped_filters(claims, filters)
    async with deps.pool.acquire() as conn:
        rows = await store.find_referrals(conn, f)
    return [to_public(r) for r in rows], f


async def get_referral(deps: Deps, *, claims: Claims, referral_id: uuid.UUID) -> dict:
    """One referral with its history, as the API shows it; `NotFound`, or `Forbidden` when it is
    addressed outside the caller's scope."""
    async with deps.pool.acquire() as conn:
        row = await store.referral(conn, referral_id)
        if row is None:
            raise NotFound(f"no referral {referral_id}")
        decision = rules.decide(claims, "referral.read", agency=row["agency"], municipality=row["municipality"])
        if not decision:
            raise Forbidden(f"referral {referral_id} is addressed to {row['office_id']}; {decision.reason}")
        history = await store.history_of(conn, referral_id)
    return {**to_public(row), "history": history}


# --- acting on a referral -------------------------------------------------------------------------


async def act(deps: Deps, *, claims: Claims, referral_id: uuid.UUID, action: Action,
              reason: DeclineReason | None = None, outcome: ReferralOutcome | None = None) -> dict:
    """Move a referral through the state machine on behalf of `claims`; returns the new row (as
    the API shows it). A refused attempt (not found, forbidden, illegal) is audited too (ids and
    subjects only; accepted ones are in the history)."""
    try:
        row = await _transition(deps, claims=claims, referral_id=referral_id, action=action,
                                reason=reason, outcome=outcome)
    except ServiceError as exc:
        audit.warning("referral %s refused: %s by %s (%s/%s): %s", action.value, referral_id, claims.sub,
                      claims.agency.value, claims.municipality, type(exc).__name__)
        raise
    deps.on_action(action.value)
    deps.wake_relay()
    return to_public(row)


async def _transition(deps: Deps, *, claims: Claims, referral_id: uuid.UUID, action: Action,
                      reason: DeclineReason | None, outcome: ReferralOutcome | None) -> asyncpg.Record:
    """Lock the row, check the caller and the transition, write the row, its history and its
    events; one transaction."""
    now = deps.clock()
    async with deps.pool.acquire() as conn, conn.transaction():
        row = await store.referral(conn, referral_id, for_update=True)
        if row is None:
            raise NotFound(f"no referral {referral_id}")
        decision = rules.decide(claims, "referral.act", agency=row["agency"], municipality=row["municipality"])
        if not decision:
            raise Forbidden(f"may not {action.value} referral {referral_id} (addressed to {row['office_id']}): "
                            f"{decision.reason}")
        current = ReferralStatus(row["status"])
        to = rules.next_status(current, action)  # IllegalTransition: a Conflict naming `current`
        data, sets, detail = _effects(row, action, current=current, to=to, now=now, reason=reason,
                                      outcome=outcome)
        new = await store.update_referral(conn, referral_id, {"status": to.value, "updated_at": now, **sets})
        cause = _Cause(row)
        env = cause.wrap(data, source=rules.source_of(claims))
        await store.publish(conn, env)
        await store.add_history(conn, referral_id, actor=claims.sub, action=action.value, from_status=current,
                                to_status=to, event_id=env.id, detail=detail, at=now)
        if action is Action.decline:
            await _escalate_declined(conn, cause, row, status=to, now=now)
    return new


def _effects(row: Any, action: Action, *, current: ReferralStatus, to: ReferralStatus, now: datetime,
             reason: DeclineReason | None, outcome: ReferralOutcome | None
             ) -> tuple[EventData, dict[str, Any], dict[str, Any]]:
    """What `action` publishes, the columns it sets besides the status, and its history detail."""
    base = dict(referral_id=row["referral_id"], case_id=row["case_id"], municipality=row["municipality"],
                agency=AgencyType(row["agency"]), office_id=row["office_id"],
                from_status=current, to_status=to)  # who acted: the history row, not the topic
    if action is Action.acknowledge:
        within = rules.within_deadline(row["deadline"], now)
        return ReferralAcknowledged(**base, within_deadline=within), {"acknowledged_at": now}, {
            "within_deadline": within}
    if action is Action.accept:
        return ReferralAccepted(**base), {"accepted_at": now}, {}
    if action is Action.decline:
        if reason is None:
            raise Invalid("reason: is required to decline; give one of the decline reasons")
        sets = dict(declined_at=now, decline_reason=reason.value, escalated=True, escalated_at=now,
                    escalated_to=rules.coordinator_of(row["municipality"]), escalation_reason="declined")
        return ReferralDeclined(**base, reason=reason), sets, {"reason": reason.value}
    if action is Action.complete:
        if outcome is None:
            raise Invalid("outcome: is required to complete; give one of the referral outcomes")
        return ReferralCompleted(**base, outcome=outcome), {"completed_at": now, "outcome": outcome.value}, {
            "outcome": outcome.value}
    raise Conflict(f"{action.value} is not an action agencies take",
                   detail={"message": f"{action.value} is not an action agencies take",
                           "current_status": current.value})


async def _escalate_declined(conn: asyncpg.Connection, cause: _Cause, row: Any, *, status: ReferralStatus,
                             now: datetime) -> None:
    """A declined referral goes to the municipality's coordinator: `referral.escalated` + history."""
    to = rules.coordinator_of(row["municipality"])
    esc = cause.wrap(ReferralEscalated(
        referral_id=row["referral_id"], case_id=row["case_id"], municipality=row["municipality"],
        agency=AgencyType(row["agency"]), office_id=row["office_id"], reason="declined",
        escalated_to=to), source=SERVICE)
    await store.publish(conn, esc)
    await store.add_history(conn, row["referral_id"], actor=SERVICE, action="escalate", from_status=status,
                            to_status=status, event_id=esc.id, at=now,
                            detail={"reason": "declined", "escalated_to": to})


@dataclass(frozen=True)
class _Cause:
    """Events about a referral keep the correlation id of the case event that opened it."""

    row: Any

    def wrap(self, data: EventData, *, source: str) -> Envelope:
        return Envelope.wrap(data, source=source, subject=self.row["case_id"],
                             correlationid=self.row["correlation_id"],
                             causationid=self.row["source_event_id"])


# --- deadlines ---------------------------------------------------------------------------------


async def escalate_due(deps: Deps, *, limit: int = 200) -> int:
    """Mark referrals still waiting for an answer at their deadline overdue and escalate them
    to the municipal coordinator, once. Safe with several replicas (`FOR UPDATE SKIP LOCKED`)
    and across restarts (the deadline and the `overdue` flag live in the database)."""
    now = deps.clock()
    async with deps.pool.acquire() as conn, conn.transaction():
        rows = await store.lock_due_referrals(conn, now=now, limit=limit)
        for row in rows:
            await _escalate_overdue(conn, row, now=now)
    for row in rows:
        deps.on_overdue(row["agency"])
    if rows:
        deps.wake_relay()
    return len(rows)


async def _escalate_overdue(conn: asyncpg.Connection, row: Any, *, now: datetime) -> None:
    """One referral past its deadline: the flags, `referral.overdue` + `referral.escalated`, and
    their history rows."""
    to = rules.coordinator_of(row["municipality"])
    await store.mark_overdue_and_escalated(conn, row["referral_id"], now=now, to=to)
    ids = dict(referral_id=row["referral_id"], case_id=row["case_id"], municipality=row["municipality"],
               agency=AgencyType(row["agency"]), office_id=row["office_id"])
    cause = _Cause(row)
    status = ReferralStatus(row["status"])
    overdue = cause.wrap(ReferralOverdue(**ids, deadline=row["deadline"], status=status), source=SERVICE)
    escalated = cause.wrap(ReferralEscalated(**ids, reason="overdue", escalated_to=to), source=SERVICE)
    for env in (overdue, escalated):
        await store.publish(conn, env)
    await store.add_history(conn, row["referral_id"], actor=SERVICE, action="overdue", from_status=status,
                            to_status=status, event_id=overdue.id, at=now,
                            detail={"deadline": row["deadline"].isoformat()})
    await store.add_history(conn, row["referral_id"], actor=SERVICE, action="escalate", from_status=status,
                            to_status=status, event_id=escalated.id, at=now,
                            detail={"reason": "overdue", "escalated_to": to})


def to_public(row: Any) -> dict:
    """A referral row as the API shows it (plus the actions that are legal next)."""
    out = dict(row)
    for k in ("source_event_id", "correlation_id", "identified_at"):
        out.pop(k, None)
    out["matched_rules"] = list(out.get("matched_rules") or [])
    out["actions"] = [a.value for a in rules.legal_actions(row["status"]) if a is not Action.close]
    return out
