"""The referral service's SQL: one function per statement, named for what it does.

Every function takes a connection; the use cases in `service.py` open the transaction around
them, so a state change, its history rows and its outbox rows commit together.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from services.referral.rules import Decision, Filters
from shared.events import CaseIdentified, Envelope, ReferralStatus
from shared.outbox import append
from shared.topics import Topic

SCHEMA = "referral"


@dataclass(frozen=True)
class Opening:
    """One case event's share of `claim_and_open`: the event, the routing decisions for it and
    the `referral.created` envelopes, one per decision, in the same order."""

    envelope: Envelope
    decisions: Sequence[Decision]
    created: Sequence[Envelope]


# One statement: inbox claim -> referrals (only if claimed; none twice per case and agency) ->
# their history rows and outbox rows (only for the referrals actually inserted).
_CLAIM_AND_OPEN = f"""
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
    select h.referral_id, $12, $26, 'created', null, 'pending', h.detail::jsonb, h.event_id
    from unnest($13::uuid[], $23::uuid[], $25::text[]) as h(referral_id, event_id, detail)
    where h.referral_id in (select referral_id from ref)
    returning 1
)
select (select count(*) from claimed) as claimed,
       array(select referral_id from ref) as opened,
       (select count(*) from ob) as published,
       (select count(*) from hist) as audited
"""


def _open_args(o: Opening, *, consumer: str, actor: str, rules_version: int, now: datetime) -> tuple:
    """The arguments of `_CLAIM_AND_OPEN` for one event (empty arrays: only the inbox claim)."""
    env, ds, case = o.envelope, o.decisions, o.envelope.data
    if isinstance(case, CaseIdentified):
        head = (case.case_id, case.municipality, case.age_band.value, case.sector.value, case.reported_by)
    else:
        head = (getattr(case, "case_id", None), getattr(case, "municipality", None), None, None, None)
    case_id, municipality, age_band, sector, reported_by = head
    return (
        env.id, consumer, env.type,
        case_id, municipality, rules_version, age_band, sector, reported_by,
        env.correlationid, env.time, now,
        [e.data.referral_id for e in o.created], [d.agency.value for d in ds],
        [d.office_id for d in ds], [d.priority for d in ds], [d.rule_id for d in ds],
        [",".join(d.matched_rules) for d in ds], [d.legal_basis for d in ds], [d.deadline for d in ds],
        Topic.referral_events.value, env.subject, [e.id for e in o.created],
        [e.to_json_bytes().decode() for e in o.created],
        [orjson.dumps({"rule_id": d.rule_id, "rule_version": d.rule_version,
                       "matched_rules": list(d.matched_rules),
                       "deadline": d.deadline.isoformat()}).decode() for d in ds],
        actor,
    )


async def claim_and_open(conn: asyncpg.Connection, openings: Sequence[Opening], *, consumer: str,
                         actor: str, rules_version: int, now: datetime) -> list[asyncpg.Record]:
    """For each event, in order and in one pipelined round trip: claim it in the inbox and, only if
    it was not claimed before, insert its referrals (none twice per case and agency) with their
    history and outbox rows. One row per event: `claimed` (0 or 1) and `opened` (referral ids)."""
    args = [_open_args(o, consumer=consumer, actor=actor, rules_version=rules_version, now=now)
            for o in openings]
    return await conn.fetchmany(_CLAIM_AND_OPEN, args)


async def close_open_referrals_of_case(conn: asyncpg.Connection, case_id: uuid.UUID,
                                       now: datetime) -> list[asyncpg.Record]:
    """Every referral of the case still open becomes `closed`; returns them with `from_status`."""
    return await conn.fetch(
        f"""with open as (
                select referral_id, status from {SCHEMA}.referral
                where case_id = $1 and status in ('pending', 'acknowledged', 'accepted') for update)
            update {SCHEMA}.referral r set status = 'closed', closed_at = $2, updated_at = $2
            from open where r.referral_id = open.referral_id
            returning r.referral_id, open.status as from_status, r.municipality, r.agency, r.office_id""",
        case_id, now,
    )


async def add_history(conn: asyncpg.Connection, referral_id: uuid.UUID, *, actor: str, action: str,
                      from_status: ReferralStatus | str | None, to_status: ReferralStatus | str,
                      event_id: uuid.UUID | None, detail: dict[str, Any] | None = None,
                      at: datetime | None = None) -> None:
    """One row of the referral's audit history (insert-only)."""
    await conn.execute(
        f"insert into {SCHEMA}.referral_history(referral_id, at, actor, action, from_status, to_status,"
        " detail, event_id) values($1, coalesce($2, now()), $3, $4, $5, $6, $7::jsonb, $8)",
        referral_id, at, actor, action, str(from_status) if from_status else None, str(to_status),
        orjson.dumps(detail or {}).decode(), event_id,
    )


async def publish(conn: asyncpg.Connection, envelope: Envelope) -> None:
    """An event for clms.referral-events, in the outbox of the current transaction."""
    await append(conn, schema=SCHEMA, topic=Topic.referral_events, envelope=envelope)


async def find_referrals(conn: asyncpg.Connection, f: Filters) -> list[asyncpg.Record]:
    """The referrals matching `f`, most pressing deadline first, one page."""
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
    return await conn.fetch(sql, *args)


async def referral(conn: asyncpg.Connection, referral_id: uuid.UUID, *,
                   for_update: bool = False) -> asyncpg.Record | None:
    """One referral (locked for the transaction with `for_update`), or None."""
    lock = " for update" if for_update else ""
    return await conn.fetchrow(f"select * from {SCHEMA}.referral where referral_id = $1{lock}", referral_id)


async def history_of(conn: asyncpg.Connection, referral_id: uuid.UUID) -> list[dict]:
    """The referral's audit history, oldest first."""
    rows = await conn.fetch(
        f"select at, actor, action, from_status, to_status, detail from {SCHEMA}.referral_history "
        "where referral_id = $1 order by id", referral_id)
    return [{**dict(h), "detail": orjson.loads(h["detail"])} for h in rows]


async def update_referral(conn: asyncpg.Connection, referral_id: uuid.UUID,
                          sets: dict[str, Any]) -> asyncpg.Record:
    """Set the columns in `sets`; returns the new row."""
    cols = list(sets)
    assign = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
    return await conn.fetchrow(
        f"update {SCHEMA}.referral set {assign} where referral_id = $1 returning *",
        referral_id, *[sets[c] for c in cols])


async def lock_due_referrals(conn: asyncpg.Connection, *, now: datetime, limit: int) -> list[asyncpg.Record]:
    """Referrals still waiting for an answer at their deadline and not yet overdue, locked; rows
    another replica holds are skipped (`SKIP LOCKED`)."""
    return await conn.fetch(
        f"""select * from {SCHEMA}.referral
            where status in ('pending', 'acknowledged') and not overdue and deadline <= $1
            order by deadline limit $2 for update skip locked""",
        now, limit)


async def mark_overdue_and_escalated(conn: asyncpg.Connection, referral_id: uuid.UUID, *,
                                     now: datetime, to: str) -> None:
    await conn.execute(
        f"""update {SCHEMA}.referral set overdue = true, overdue_at = $2, escalated = true,
               escalated_at = $2, escalated_to = $3, escalation_reason = 'overdue', updated_at = $2
            where referral_id = $1""",
        referral_id, now, to)


async def open_and_overdue_by_agency(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Per agency: referrals still open (`open`) and, of them, overdue (`overdue`)."""
    return await conn.fetch(
        f"select agency, count(*) as open, count(*) filter (where overdue) as overdue "
        f"from {SCHEMA}.referral where status in ('pending', 'acknowledged', 'accepted') "
        "group by agency")
