"""Intake's SQL: one function per statement, named for what it does. The use cases in service.py
call these inside their own transactions (the caller owns the connection and the transaction).

Every statement names the schema `intake` (deps.SCHEMA). jsonb values are passed and read as text.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import asyncpg

from services.intake.deps import SCHEMA

if TYPE_CHECKING:
    from services.intake.service import Actor

INBOUND_CONSUMER = "intake.agency-inbound"


# --- audit -----------------------------------------------------------------------------------------------


async def add_audit_row(conn: asyncpg.Connection, *, actor: "Actor", action: str, outcome: str,
                        case_id: uuid.UUID | None) -> None:
    await conn.execute(
        f"insert into {SCHEMA}.audit(actor, actor_agency, actor_municipality, action, outcome, case_id, "
        "client_addr, channel) values($1, $2, $3, $4, $5, $6, $7, $8)",
        actor.sub, actor.agency.value, actor.municipality, action, outcome, case_id,
        actor.client_addr, actor.channel,
    )


# --- a new case: five rows in one statement ----------------------------------------------------------------

# The case row, its wrapped data key, its first history row, the audit row and the outbox row (the
# outbox columns are those of shared.outbox.append), in one statement: one round trip. `l` is the
# linked case id; $1.. are `case_row_args` (service._case_args).
_CASE_COLUMNS = ("case_id, child_ref, linked_case_id, municipality, identified_on, report_source, "
                 "reporter_agency, reporter_municipality, reported_by, channel, age_at_identification, age_band, "
                 "compulsory_school_age, sex, community, school_status, sector, activity, hazardous, worst_form, "
                 "employer_involved, pii_ciphertext")
_CASE_VALUES = ", ".join("l.linked" if i == 3 else f"${i}" for i in range(1, 23))


def _insert_case_statement(linked: str) -> str:
    """The five rows of a new case, with the linked case id taken from the SQL expression `linked`;
    the statement returns that linked id."""
    return f"""
with l as (
    select {linked} as linked
), c as (
    insert into {SCHEMA}.cases({_CASE_COLUMNS})
    select {_CASE_VALUES} from l
    returning case_id
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


# Inside the caller's transaction, which looked up the linked case (first_case_of) itself.
_INSERT_CASE = _insert_case_statement("$3::uuid")

# The common case (no Idempotency-Key, not an inbound event) as ONE statement in its own implicit
# transaction: the child lock + first-case lookup and the five rows, the linked id returned. One
# round trip instead of four (BEGIN, lookup, insert, COMMIT): bench/README.md, Performance. The
# advisory lock is held to the end of the statement's transaction, and first_case_of's lookup
# (plpgsql, volatile) runs on a snapshot taken after the lock. ($3 is always null here.)
_LINK_AND_INSERT_CASE = _insert_case_statement(f"coalesce({SCHEMA}.first_case_of($2), $3::uuid)")


async def insert_case(conn: asyncpg.Connection, args: tuple) -> None:
    """The five rows of a new case whose linked case id is args[2] (the caller holds the child's lock)."""
    await conn.execute(_INSERT_CASE, *args)


async def link_and_insert_case(conn: asyncpg.Connection, args: tuple) -> uuid.UUID | None:
    """Lock the child, find its first case, insert the five rows linked to it; the linked id."""
    return await conn.fetchval(_LINK_AND_INSERT_CASE, *args)


async def first_case_of(conn: asyncpg.Connection, ref: str) -> uuid.UUID | None:
    """The root case of the child `ref`, under the child's advisory lock (held to the transaction's end),
    so the second of two simultaneous reports links to the first."""
    return await conn.fetchval(f"select {SCHEMA}.first_case_of($1)", ref)


# --- inbound and idempotency -------------------------------------------------------------------------------


async def claim_inbound(conn: asyncpg.Connection, *, inbox_id: uuid.UUID, event_type: str) -> bool:
    """Record an inbound event as applied; False when it had been applied before."""
    claimed = await conn.fetchval(
        f"insert into {SCHEMA}.inbox(event_id, consumer, event_type) values($1, $2, $3) "
        "on conflict do nothing returning 1",
        inbox_id, INBOUND_CONSUMER, event_type,
    )
    return claimed is not None


async def case_link_and_key(conn: asyncpg.Connection, case_id: uuid.UUID) -> asyncpg.Record | None:
    """linked_case_id, wrapped_key, master_key_id of a case (the key columns null once erased)."""
    return await conn.fetchrow(
        f"select c.linked_case_id, k.wrapped_key, k.master_key_id from {SCHEMA}.cases c "
        f"left join {SCHEMA}.case_keys k using (case_id) where c.case_id = $1", case_id)


async def remember_answer(conn: asyncpg.Connection, *, subject: str, key: str, request_hash: str,
                          case_id: uuid.UUID, response: str) -> bool:
    """Keep the answer of an Idempotency-Key; False when the key had been used before."""
    inserted = await conn.fetchval(
        f"insert into {SCHEMA}.idempotency_keys(subject, key, request_hash, case_id, response) "
        "values($1, $2, $3, $4, $5::jsonb) on conflict do nothing returning 1",
        subject, key, request_hash, case_id, response,
    )
    return inserted is not None


async def first_answer(conn: asyncpg.Connection, *, subject: str, key: str) -> asyncpg.Record:
    """request_hash and response (JSON text) kept for an Idempotency-Key."""
    return await conn.fetchrow(
        f"select request_hash, response from {SCHEMA}.idempotency_keys where subject = $1 and key = $2",
        subject, key)


async def delete_old_idempotency_rows(pool: asyncpg.Pool, *, older_than_s: float, batch: int) -> int:
    """Delete at most `batch` Idempotency-Key rows older than `older_than_s`; how many went."""
    async with pool.acquire() as conn:
        return await conn.fetchval(
            f"with gone as (delete from {SCHEMA}.idempotency_keys where ctid in ("
            f"select ctid from {SCHEMA}.idempotency_keys "
            "where created_at < now() - make_interval(secs => $1) limit $2) returning 1) "
            "select count(*) from gone", float(older_than_s), batch)


# --- reading a case ---------------------------------------------------------------------------------------


async def case_scope(conn: asyncpg.Connection, case_id: uuid.UUID) -> asyncpg.Record | None:
    """What the access policy needs of a case: its municipality and reporting office."""
    return await conn.fetchrow(f"select case_id, municipality, reporter_agency, reporter_municipality "
                               f"from {SCHEMA}.cases where case_id = $1", case_id)


async def case_row(conn: asyncpg.Connection, case_id: uuid.UUID, *, for_update: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select * from {SCHEMA}.cases where case_id = $1"
                               + (" for update" if for_update else ""), case_id)


async def referral_holders(conn: asyncpg.Connection, case_id: uuid.UUID) -> list[asyncpg.Record]:
    """agency, municipality, open: the offices that hold (or held) a referral for the case."""
    return await conn.fetch(f"select agency, municipality, open from {SCHEMA}.case_access where case_id = $1",
                            case_id)


async def case_key(conn: asyncpg.Connection, case_id: uuid.UUID) -> asyncpg.Record | None:
    """wrapped_key, master_key_id of a case (None once erased)."""
    return await conn.fetchrow(f"select wrapped_key, master_key_id from {SCHEMA}.case_keys "
                               "where case_id = $1", case_id)


async def case_history(conn: asyncpg.Connection, case_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"select event_id, event_type, at, actor, agency, detail, note_ciphertext, confirmed_on "
        f"from {SCHEMA}.case_events "
        "where case_id = $1 order by at, event_id", case_id)


async def referred_offices(conn: asyncpg.Connection, case_id: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(f"select distinct office_id from {SCHEMA}.case_access "
                            "where case_id = $1 order by office_id", case_id)


# --- follow-up events ------------------------------------------------------------------------------------


async def update_case(conn: asyncpg.Connection, case_id: uuid.UUID, changes: dict[str, Any]) -> None:
    """Set the changed columns (names from service._outcome_data, never from input) and updated_at."""
    sets = ", ".join(f"{col} = ${i}" for i, col in enumerate(changes, start=2))
    await conn.execute(
        f"update {SCHEMA}.cases set {sets + ', ' if sets else ''}updated_at = now() where case_id = $1",
        case_id, *changes.values())


async def open_referral_agencies(conn: asyncpg.Connection, case_id: uuid.UUID) -> list[str]:
    rows = await conn.fetch(f"select distinct agency from {SCHEMA}.case_access "
                            "where case_id = $1 and open", case_id)
    return [r["agency"] for r in rows]


async def wrapped_key(conn: asyncpg.Connection, case_id: uuid.UUID) -> bytes | None:
    return await conn.fetchval(f"select wrapped_key from {SCHEMA}.case_keys where case_id = $1", case_id)


async def add_case_event(conn: asyncpg.Connection, *, event_id: uuid.UUID, case_id: uuid.UUID, event_type: str,
                         actor: str, agency: str, detail: str | None, note: bytes | None, confirmed_on: Any) -> None:
    await conn.execute(
        f"insert into {SCHEMA}.case_events(event_id, case_id, event_type, actor, agency, detail, "
        "note_ciphertext, confirmed_on) values($1,$2,$3,$4,$5,$6::jsonb,$7,$8)", event_id, case_id,
        event_type, actor, agency, detail, note, confirmed_on)


# --- referral holders ------------------------------------------------------------------------------------


async def add_referral_holder(conn: asyncpg.Connection, *, case_id: uuid.UUID, agency: str, municipality: str,
                              referral_id: uuid.UUID, office_id: str | None) -> None:
    await conn.execute(
        f"insert into {SCHEMA}.case_access(case_id, agency, municipality, referral_id, office_id) "
        "values($1, $2, $3, $4, $5) on conflict do nothing",
        case_id, agency, municipality, referral_id, office_id)


async def close_referral(conn: asyncpg.Connection, referral_id: uuid.UUID) -> None:
    """No longer open (the office keeps read access to the case it worked on)."""
    await conn.execute(
        f"update {SCHEMA}.case_access set open = false, closed_at = now() "
        "where referral_id = $1 and open", referral_id)


# --- crypto-erasure --------------------------------------------------------------------------------------


async def lock_case_for_erasure(conn: asyncpg.Connection, case_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select case_id, erased_at from {SCHEMA}.cases where case_id = $1 for update",
                               case_id)


async def delete_case_key(conn: asyncpg.Connection, case_id: uuid.UUID) -> None:
    await conn.execute(f"delete from {SCHEMA}.case_keys where case_id = $1", case_id)


async def drop_identity(conn: asyncpg.Connection, case_id: uuid.UUID) -> Any:
    """Drop the ciphertext, the cross-case pseudonym and the link; when it was erased (first time kept)."""
    return await conn.fetchval(
        f"update {SCHEMA}.cases set pii_ciphertext = null, child_ref = null, linked_case_id = null, "
        "erased_at = coalesce(erased_at, now()), updated_at = now() where case_id = $1 returning erased_at",
        case_id)


async def relink_cases_linked_to(conn: asyncpg.Connection, case_id: uuid.UUID) -> None:
    """Cases that linked to `case_id` link to the earliest remaining earlier case of the child, or to none."""
    await conn.execute(
        f"""update {SCHEMA}.cases c set linked_case_id = (
                select f.case_id from {SCHEMA}.cases f
                where f.child_ref = c.child_ref and (f.created_at, f.case_id) < (c.created_at, c.case_id)
                order by f.created_at, f.case_id limit 1)
            where c.linked_case_id = $1""", case_id)


async def unname_in_outbox(conn: asyncpg.Connection, case_id: str, *, erased_child_ref: str) -> None:
    """The case's own case.identified keeps its facts with `erased_child_ref`, and no outbox row
    keeps a linked_case_id naming the case."""
    await conn.execute(
        f"""update {SCHEMA}.outbox set envelope = jsonb_set(jsonb_set(envelope, '{{data,child_ref}}',
                to_jsonb($2::text)), '{{data,linked_case_id}}', 'null'::jsonb)
            where key = $1 and event_type = 'case.identified'""", case_id, erased_child_ref)
    await conn.execute(
        f"""update {SCHEMA}.outbox set envelope = jsonb_set(envelope, '{{data,linked_case_id}}', 'null'::jsonb)
            where event_type = 'case.identified' and envelope #>> '{{data,linked_case_id}}' = $1""", case_id)


async def forget_idempotency_answers(conn: asyncpg.Connection, case_id: uuid.UUID) -> None:
    """Delete the case's Idempotency-Key answers and unname it in the others."""
    await conn.execute(f"delete from {SCHEMA}.idempotency_keys where case_id = $1", case_id)
    await conn.execute(
        f"""update {SCHEMA}.idempotency_keys set response = jsonb_set(response, '{{linked_case_id}}', 'null'::jsonb)
            where response ->> 'linked_case_id' = $1""", str(case_id))


async def drop_notes(conn: asyncpg.Connection, case_id: uuid.UUID) -> None:
    """An erased case keeps no free text (the coordinator's override reasons)."""
    await conn.execute(f"update {SCHEMA}.case_events set note_ciphertext = null "
                       "where case_id = $1 and note_ciphertext is not null", case_id)


# --- master key rotation ---------------------------------------------------------------------------------


async def data_keys_by_master_key(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch(f"select master_key_id, count(*) as n from {SCHEMA}.case_keys group by 1 order by 1")
    return {r["master_key_id"]: r["n"] for r in rows}


async def lock_keys_to_rewrap(conn: asyncpg.Connection, *, kids: list[str], batch: int) -> list[asyncpg.Record]:
    """Up to `batch` data keys wrapped by one of `kids`, each locked (others skip them)."""
    return await conn.fetch(
        f"select case_id, wrapped_key, master_key_id from {SCHEMA}.case_keys "
        "where master_key_id = any($1::text[]) order by case_id limit $2 for update skip locked", kids, batch)


async def store_rewrapped_key(conn: asyncpg.Connection, case_id: uuid.UUID, wrapped: bytes, kid: str) -> None:
    await conn.execute(f"update {SCHEMA}.case_keys set wrapped_key = $2, master_key_id = $3 "
                       "where case_id = $1", case_id, wrapped, kid)
