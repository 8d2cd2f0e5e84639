"""Use cases of the referral service. Each state change and its outbox rows commit together.

- `apply_case_event`: a case event from clms.case-events (inbox claim + referrals + outbox).
- `list_referrals` / `get_referral`: what a caseworker or coordinator may see.
- `act`: acknowledge / accept / decline / complete (row lock, legal transition, history, outbox).
- `escalate_due`: referrals past their deadline still waiting for an answer -> overdue + escalated.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg
import orjson

from services.referral import states
from services.referral.rules import RuleSet
from shared import access
from shared.auth import Claims
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
from shared.outbox import append
from shared.topics import Topic

SCHEMA = "referral"
SERVICE = "referral"  # envelope source and actor of what the service itself does
CONSUMER = "referral.case-events"  # inbox consumer name
_ID_NAMESPACE = uuid.UUID("6f2b0f8e-8d1e-4c55-9a51-2f7f0c0e4a11")

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --- errors the API turns into answers ---------------------------------------------------------


class NotFound(LookupError):
    pass


class Forbidden(PermissionError):
    pass


class Conflict(ValueError):
    def __init__(self, message: str, current: str):
        super().__init__(message)
        self.current = current


class UnexpectedEvent(ValueError):
    """An event that does not belong on the topic (dead-lettered by the worker)."""


# --- what the use cases need -----------------------------------------------------------------


@dataclass
class Deps:
    pool: asyncpg.Pool
    rules: RuleSet
    clock: Clock = utcnow
    wake_relay: Callable[[], None] = lambda: None
    on_opened: Callable[[str, str], None] = lambda agency, priority: None
    on_overdue: Callable[[str], None] = lambda agency: None
    on_action: Callable[[str], None] = lambda action: None


def referral_id_for(event_id: uuid.UUID, agency: str) -> uuid.UUID:
    """Deterministic: the same case event and agency always name the same referral."""
    return uuid.uuid5(_ID_NAMESPACE, f"{event_id}:{agency}")


def coordinator_of(municipality: str) -> str:
    return f"coordinator.{municipality}"


def _source_of(claims: Claims) -> str:
    muni = "all" if claims.municipality == "*" else claims.municipality
    return f"{claims.agency.value}/{muni}"


# --- consuming case events ---------------------------------------------------------------------


async def apply_case_event(deps: Deps, *, envelope: Envelope) -> list[uuid.UUID]:
    """Apply one event from clms.case-events; returns the referrals opened (none if seen before).

    `case.identified` opens one referral per target agency: the inbox claim, the referral rows,
    their history rows and their `referral.created` outbox rows are ONE statement, so ONE
    transaction: either the event is applied with everything it causes, or not at all. A case
    that already has a referral to an agency gets no second one. The other case.* events are
    recorded as applied and change nothing. Anything else raises `UnexpectedEvent` (the worker
    dead-letters it).
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
    batch = [_open_args(deps, env, now) for env in envelopes]
    async with deps.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetchmany(_OPEN_SQL, [args for args, _ in batch])
        closed = 0
        for env, row in zip(envelopes, rows, strict=True):
            if isinstance(env.data, CaseClosed) and row["claimed"]:
                closed += await _close_with_case(conn, env, now)
    if closed:
        deps.wake_relay()
    out = []
    for row, (_, created) in zip(rows, batch, strict=True):
        opened = list(row["opened"])
        by_id = {e.data.referral_id: e.data for e in created}
        for rid in opened:
            deps.on_opened(by_id[rid].agency.value, by_id[rid].priority)
        out.append(opened)
    if any(out):
        deps.wake_relay()
    return out


async def _close_with_case(conn: asyncpg.Connection, envelope: Envelope, now: datetime) -> int:
    """The case closed: every referral of it still open closes too (status `closed`, history,
    `referral.closed` in the outbox), so none of them runs into a deadline and an escalation.
    Runs in the transaction that claims the case.closed event."""
    case: CaseClosed = envelope.data  # type: ignore[assignment]
    rows = await conn.fetch(
        f"""with open as (
                select referral_id, status from {SCHEMA}.referral
                where case_id = $1 and status in ('pending', 'acknowledged', 'accepted') for update)
            update {SCHEMA}.referral r set status = 'closed', closed_at = $2, updated_at = $2
            from open where r.referral_id = open.referral_id
            returning r.referral_id, open.status as from_status, r.municipality, r.agency, r.office_id""",
        case.case_id, now,
    )
    for r in rows:
        event = envelope.follow(ReferralClosed(
            referral_id=r["referral_id"], case_id=case.case_id, municipality=r["municipality"],
            agency=AgencyType(r["agency"]), office_id=r["office_id"],
            from_status=ReferralStatus(r["from_status"]), to_status=ReferralStatus.closed,
            case_reason=case.reason,
        ), source=SERVICE)
        await _history(conn, r["referral_id"], actor=envelope.source, action="closed",
                       from_status=r["from_status"], to_status=ReferralStatus.closed, event_id=event.id,
                       detail={"case_reason": case.reason.value}, at=now)
        await append(conn, schema=SCHEMA, topic=Topic.referral_events, envelope=event)
    return len(rows)


def _open_args(deps: Deps, envelope: Envelope, now: datetime) -> tuple[tuple, list[Envelope]]:
    """Arguments of `_OPEN_SQL` for one event (empty arrays: only the inbox claim)."""
    case = envelope.data
    if isinstance(case, CaseIdentified):
        decisions = deps.rules.route(case, at=envelope.time)
        head = (case.case_id, case.municipality, case.age_band.value, case.sector.value, case.reported_by)
    else:
        decisions = []
        head = (getattr(case, "case_id", None), getattr(case, "municipality", None), None, None, None)
    created = [
        envelope.follow(ReferralCreated(
            referral_id=referral_id_for(envelope.id, d.agency.value), case_id=case.case_id,
            municipality=case.municipality, agency=d.agency, office_id=d.office_id, rule_id=d.rule_id,
            rule_version=d.rule_version, priority=d.priority, deadline=d.deadline,
            legal_basis=d.legal_basis, age_band=case.age_band, sector=case.sector,
            reported_by=case.reported_by,
        ), source=SERVICE)
        for d in decisions
    ]
    case_id, municipality, age_band, sector, reported_by = head
    args = (
        envelope.id, CONSUMER, envelope.type,
        case_id, municipality, deps.rules.version, age_band, sector, reported_by,
        envelope.correlationid, envelope.time, now,
        [e.data.referral_id for e in created], [d.agency.value for d in decisions],
        [d.office_id for d in decisions], [d.priority for d in decisions], [d.rule_id for d in decisions],
        [",".join(d.matched_rules) for d in decisions], [d.legal_basis for d in decisions],
        [d.deadline for d in decisions],
        Topic.referral_events.value, envelope.subject, [e.id for e in created],
        [e.to_json_bytes().decode() for e in created],
        [orjson.dumps({"rule_id": d.rule_id, "rule_version": d.rule_version,
                       "matched_rules": list(d.matched_rules),
                       "deadline": d.deadline.isoformat()}).decode() for d in decisions],
    )
    return args, created


# One statement: inbox claim -> referrals (only if claimed; none twice per case and agency) ->
# their history rows and outbox rows (only for the referrals actually inserted).
_OPEN_SQL = f"""
with claimed as (
    insert into {SCHEMA}.inbox(event_id, consumer, event_type) values ($1, $2, $3)
    on conflict do nothing returning 1
), ref as (
    insert into {SCHEMA}.referral(
        referral_id, case_id, municipality, agency, office_id, priority, rule_id, rule_version,
        matched_rules, legal_basis, age_band, sector, reported_by, source_event_id, correlation_id,
        identified_at, deadline, created_at, updated_at)
    select t.referral_id, $4::uuid, $5::text, t.agency, t.office_id, t.priority, t.rule_id, $6,
           string_to_array(t.matched, ','), t.legal_basis, $7::text, $8::text, $9::text, $1, $10, $11,
           t.deadline, $12, $12
    from unnest($13::uuid[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[],
                $19::text[], $20::timestamptz[])
         with ordinality as t(referral_id, agency, office_id, priority, rule_id, matched, legal_basis,
                              deadline, ord)
    where exists (select 1 from claimed)
    order by t.ord
    on conflict (case_id, agency) do nothing
    returning referral_id
), ob as (
    insert into {SCHEMA}.outbox(event_id, topic, key, event_type, envelope)
    select o.event_id, $21, $22, 'referral.created', o.envelope::jsonb
    from unnest($13::uuid[], $23::uuid[], $24::text[]) with ordinality as o(referral_id, event_id, envelope, ord)
    where o.referral_id in (select referral_id from ref)
    order by o.ord
    returning 1
), hist as (
    insert into {SCHEMA}.referral_history(referral_id, at, actor, action, from_status, to_status, detail, event_id)
    select h.referral_id, $12, '{SERVICE}', 'created', null, 'pending', h.detail::jsonb, h.event_id
    from unnest($13::uuid[], $23::uuid[], $25::text[]) as h(referral_id, event_id, detail)
    where h.referral_id in (select referral_id from ref)
    returning 1
)
select (select count(*) from claimed) as claimed,
       array(select referral_id from ref) as opened,
       (select count(*) from ob) as published,
       (select count(*) from hist) as audited
"""


async def _history(conn: asyncpg.Connection, referral_id: uuid.UUID, *, actor: str, action: str,
                   from_status: ReferralStatus | str | None, to_status: ReferralStatus | str,
                   event_id: uuid.UUID | None, detail: dict[str, Any] | None = None,
                   at: datetime | None = None) -> None:
    await conn.execute(
        f"insert into {SCHEMA}.referral_history(referral_id, at, actor, action, from_status, to_status,"
        " detail, event_id) values($1, coalesce($2, now()), $3, $4, $5, $6, $7::jsonb, $8)",
        referral_id, at, actor, action, str(from_status) if from_status else None, str(to_status),
        orjson.dumps(detail or {}).decode(), event_id,
    )


# --- who may see and act ------------------------------------------------------------------------


def _in_municipality(claims: Claims, municipality: str) -> bool:
    return claims.municipality in (municipality, "*")


def _referral(agency: str, municipality: str) -> access.Resource:
    """A referral as the access policy sees it: addressed to one office of one municipality."""
    return access.Resource(municipality=municipality, offices=frozenset({(agency, municipality)}))


def decide(claims: Claims, action: str, *, agency: str, municipality: str) -> access.Decision:
    """`referral.read` or `referral.act` on a referral to `agency` in `municipality`
    (shared/access_policy.yaml: the receiving office's caseworkers, duty officers and supervisors,
    and the municipality's coordinator)."""
    return access.allowed(claims, action, _referral(agency, municipality))


def may_handle(claims: Claims, *, agency: str, municipality: str) -> bool:
    return bool(decide(claims, "referral.act", agency=agency, municipality=municipality))


@dataclass(frozen=True)
class Filters:
    case_id: uuid.UUID | None = None
    agency: AgencyType | None = None
    municipality: str | None = None
    status: ReferralStatus | None = None
    overdue: bool | None = None
    limit: int = 100
    offset: int = 0


def scoped_filters(claims: Claims, f: Filters) -> Filters:
    """Narrow a query to what the caller may see; `Forbidden` when it asks for more.

    - coordinator: every agency in their municipality (all municipalities with `*`);
    - caseworker / duty officer / supervisor: their own agency in their municipality;
    - anyone else (reporters, analysts, the public): 403.
    Asking explicitly for another municipality or agency is a 403, never a silently empty list.
    """
    muni = f.municipality
    reach = access.policy().reach(claims, "referral.read")
    if reach in ("own_municipality", "national"):
        if muni and reach == "own_municipality" and not _in_municipality(claims, muni):
            raise Forbidden(f"a coordinator of {claims.municipality} cannot see referrals in {muni}")
        if claims.municipality != "*" and reach == "own_municipality":
            muni = claims.municipality
        return Filters(**{**f.__dict__, "municipality": muni})
    if reach is None:
        raise Forbidden(access.allowed(claims, "referral.read", _referral("-", "-")).reason)
    if f.agency and f.agency is not claims.agency:
        raise Forbidden(f"{claims.agency.value} staff cannot see referrals addressed to {f.agency.value}")
    if muni and not _in_municipality(claims, muni):
        raise Forbidden(f"staff of {claims.municipality} cannot see referrals in {muni}")
    if claims.municipality != "*":
        muni = claims.municipality
    return Filters(**{**f.__dict__, "agency": claims.agency, "municipality": muni})


async def list_referrals(deps: Deps, *, claims: Claims, filters: Filters) -> tuple[list[dict], Filters]:
    f = scoped_filters(claims, filters)
    where, args = [], []
    for column, value in (("case_id", f.case_id), ("agency", f.agency and f.agency.value),
                          ("municipality", f.municipality), ("status", f.status and f.status.value),
                          ("overdue", f.overdue)):
        if value is not None:
            args.append(value)
            where.append(f"r.{column} = ${len(args)}")
    sql = f"select r.* from {SCHEMA}.referral r"
    if where:
        sql += " where " + " and ".join(where)
    args += [f.limit, f.offset]
    sql += f" order by r.deadline, r.referral_id limit ${len(args) - 1} offset ${len(args)}"
    async with deps.pool.acquire() as conn:
        rows = await conn.fetch(sql, *args)
    return [dict(r) for r in rows], f


async def get_referral(deps: Deps, *, claims: Claims, referral_id: uuid.UUID) -> dict:
    async with deps.pool.acquire() as conn:
        row = await conn.fetchrow(f"select * from {SCHEMA}.referral where referral_id = $1", referral_id)
        if row is None:
            raise NotFound(f"no referral {referral_id}")
        decision = decide(claims, "referral.read", agency=row["agency"], municipality=row["municipality"])
        if not decision:
            raise Forbidden(f"referral {referral_id} is addressed to {row['office_id']}; {decision.reason}")
        history = await conn.fetch(
            f"select at, actor, action, from_status, to_status, detail from {SCHEMA}.referral_history "
            "where referral_id = $1 order by id", referral_id)
    out = dict(row)
    out["history"] = [{**dict(h), "detail": orjson.loads(h["detail"])} for h in history]
    return out


# --- acting on a referral -------------------------------------------------------------------------


async def act(deps: Deps, *, claims: Claims, referral_id: uuid.UUID, action: states.Action,
              reason: DeclineReason | None = None, outcome: ReferralOutcome | None = None) -> dict:
    """Move a referral through the state machine on behalf of `claims`; returns the new row."""
    now = deps.clock()
    async with deps.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"select * from {SCHEMA}.referral where referral_id = $1 for update", referral_id)
        if row is None:
            raise NotFound(f"no referral {referral_id}")
        decision = decide(claims, "referral.act", agency=row["agency"], municipality=row["municipality"])
        if not decision:
            raise Forbidden(f"may not {action.value} referral {referral_id} (addressed to {row['office_id']}): "
                            f"{decision.reason}")
        current = ReferralStatus(row["status"])
        try:
            to = states.next_status(current, action)
        except states.IllegalTransition as exc:
            raise Conflict(str(exc), current.value) from None

        base = dict(referral_id=referral_id, case_id=row["case_id"], municipality=row["municipality"],
                    agency=AgencyType(row["agency"]), office_id=row["office_id"],
                    from_status=current, to_status=to)  # who acted: the history row, not the topic
        sets = {"status": to.value, "updated_at": now}
        detail: dict[str, Any] = {}
        data: EventData
        if action is states.Action.acknowledge:
            within = states.within_deadline(row["deadline"], now)
            data = ReferralAcknowledged(**base, within_deadline=within)
            sets["acknowledged_at"] = now
            detail["within_deadline"] = within
        elif action is states.Action.accept:
            data = ReferralAccepted(**base)
            sets["accepted_at"] = now
        elif action is states.Action.decline:
            if reason is None:
                raise ValueError("reason is required to decline")
            data = ReferralDeclined(**base, reason=reason)
            sets.update(declined_at=now, decline_reason=reason.value, escalated=True, escalated_at=now,
                        escalated_to=coordinator_of(row["municipality"]), escalation_reason="declined")
            detail["reason"] = reason.value
        elif action is states.Action.complete:
            if outcome is None:
                raise ValueError("outcome is required to complete")
            data = ReferralCompleted(**base, outcome=outcome)
            sets.update(completed_at=now, outcome=outcome.value)
            detail["outcome"] = outcome.value
        else:
            raise Conflict(f"{action.value} is not an action agencies take", current.value)

        cols = list(sets)
        assign = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
        new = await conn.fetchrow(
            f"update {SCHEMA}.referral set {assign} where referral_id = $1 returning *",
            referral_id, *[sets[c] for c in cols])
        causer = _Cause(row)
        env = causer.wrap(data, source=_source_of(claims))
        await append(conn, schema=SCHEMA, topic=Topic.referral_events, envelope=env)
        await _history(conn, referral_id, actor=claims.sub, action=action.value, from_status=current,
                       to_status=to, event_id=env.id, detail=detail, at=now)
        if action is states.Action.decline:
            esc = causer.wrap(ReferralEscalated(
                referral_id=referral_id, case_id=row["case_id"], municipality=row["municipality"],
                agency=AgencyType(row["agency"]), office_id=row["office_id"], reason="declined",
                escalated_to=coordinator_of(row["municipality"])), source=SERVICE)
            await append(conn, schema=SCHEMA, topic=Topic.referral_events, envelope=esc)
            await _history(conn, referral_id, actor=SERVICE, action="escalate", from_status=to,
                           to_status=to, event_id=esc.id, at=now,
                           detail={"reason": "declined", "escalated_to": coordinator_of(row["municipality"])})
    deps.on_action(action.value)
    deps.wake_relay()
    return dict(new)


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
        rows = await conn.fetch(
            f"""select * from {SCHEMA}.referral
                where status in ('pending', 'acknowledged') and not overdue and deadline <= $1
                order by deadline limit $2 for update skip locked""",
            now, limit)
        for row in rows:
            to = coordinator_of(row["municipality"])
            await conn.execute(
                f"""update {SCHEMA}.referral set overdue = true, overdue_at = $2, escalated = true,
                       escalated_at = $2, escalated_to = $3, escalation_reason = 'overdue', updated_at = $2
                    where referral_id = $1""",
                row["referral_id"], now, to)
            ids = dict(referral_id=row["referral_id"], case_id=row["case_id"],
                       municipality=row["municipality"], agency=AgencyType(row["agency"]),
                       office_id=row["office_id"])
            cause = _Cause(row)
            status = ReferralStatus(row["status"])
            overdue = cause.wrap(ReferralOverdue(**ids, deadline=row["deadline"], status=status),
                                 source=SERVICE)
            escalated = cause.wrap(ReferralEscalated(**ids, reason="overdue", escalated_to=to),
                                   source=SERVICE)
            for env in (overdue, escalated):
                await append(conn, schema=SCHEMA, topic=Topic.referral_events, envelope=env)
            await _history(conn, row["referral_id"], actor=SERVICE, action="overdue", from_status=status,
                           to_status=status, event_id=overdue.id, at=now,
                           detail={"deadline": row["deadline"].isoformat()})
            await _history(conn, row["referral_id"], actor=SERVICE, action="escalate", from_status=status,
                           to_status=status, event_id=escalated.id, at=now,
                           detail={"reason": "overdue", "escalated_to": to})
    for row in rows:
        deps.on_overdue(row["agency"])
    if rows:
        deps.wake_relay()
    return len(rows)


def to_public(row: dict) -> dict:
    """A referral row as the API shows it (plus the actions that are legal next)."""
    out = dict(row)
    for k in ("source_event_id", "correlation_id", "identified_at"):
        out.pop(k, None)
    out["matched_rules"] = list(out.get("matched_rules") or [])
    out["actions"] = [a.value for a in states.legal_actions(row["status"]) if a is not states.Action.close]
    return out

