"""The SQL of the notifications service: one function per statement, named for what it does,
over a connection the caller holds (and whose transaction it chose). Schema `notifications`
(`migrations/`)."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from services.notifications.rules import Contact

SCHEMA = "notifications"
MIGRATIONS = Path(__file__).parent / "migrations"
S = SCHEMA


# --- officer directory ---------------------------------------------------------------------------


async def known_officer_ids(conn: asyncpg.Connection, officer_ids: list[str]) -> set[str]:
    return {r["officer_id"] for r in await conn.fetch(
        f"select officer_id from {S}.officers where officer_id = any($1::text[])", officer_ids)}


async def upsert_officers(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    """Rows of (officer_id, agency, municipality, office_id, role, language, email, phone, inapp,
    on_duty): added, or updated by officer_id."""
    await conn.executemany(
        f"""insert into {S}.officers(officer_id, agency, municipality, office_id, role, language,
                                     email, phone, inapp, on_duty)
            values($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            on conflict (officer_id) do update set
                agency = excluded.agency, municipality = excluded.municipality,
                office_id = excluded.office_id, role = excluded.role, language = excluded.language,
                email = excluded.email, phone = excluded.phone, inapp = excluded.inapp,
                on_duty = excluded.on_duty, updated_at = now()""",
        rows,
    )


async def directory_is_empty(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval(f"select exists(select 1 from {S}.officers)")


async def officers(conn: asyncpg.Connection, *, municipality: str | None,
                   office_id: str | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select * from {S}.officers where ($1::text is null or municipality = $1)
            and ($2::text is null or office_id = $2) order by office_id, role, officer_id""",
        municipality, office_id)


def _contact(r: asyncpg.Record) -> Contact:
    return Contact(officer_id=r["officer_id"], role=r["role"], language=r["language"],
                   email=bool(r["email"]), phone=bool(r["phone"]), inapp=r["inapp"],
                   on_duty=r["on_duty"], office_id=r["office_id"])


async def contacts(conn: asyncpg.Connection, *, offices: list[str], officer_ids: list[str] = ()) -> list[Contact]:
    """The directory entries of these offices and these officers (what the rules need of them)."""
    if not officer_ids:
        rows = await conn.fetch(f"select * from {S}.officers where office_id = any($1::text[])", offices)
    else:
        rows = await conn.fetch(
            f"select * from {S}.officers where office_id = any($1::text[]) or officer_id = any($2::text[])",
            offices, list(officer_ids))
    return [_contact(r) for r in rows]


# --- recording events ----------------------------------------------------------------------------


async def claim_events(conn: asyncpg.Connection, event_ids: list[uuid.UUID], *, consumer: str,
                       event_type: str) -> set[uuid.UUID]:
    """Claim the event ids in the inbox; returns those not claimed before."""
    return {r["event_id"] for r in await conn.fetch(
        f"""insert into {S}.inbox(event_id, consumer, event_type)
            select id, $2, $3 from unnest($1::uuid[]) as id
            on conflict do nothing returning event_id""",
        event_ids, consumer, event_type)}


_INSERT_REFERRAL = f"""
    insert into {S}.referrals(referral_id, case_id, municipality, agency, office_id, reported_by,
        priority, deadline, age_band, sector, created_event_id, correlation_id)
    values($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    on conflict (referral_id) do nothing"""


async def insert_referrals(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    """Keep what later events of each referral need (its office, reporter, priority...)."""
    if len(rows) == 1:
        await conn.execute(_INSERT_REFERRAL, *rows[0])
    else:
        await conn.executemany(_INSERT_REFERRAL, rows)


async def mark_referral_handled(conn: asyncpg.Connection, referral_id: uuid.UUID) -> None:
    """Someone saw the referral: no re-alert for it any more."""
    await conn.execute(f"update {S}.referrals set handled_at = now() where referral_id = $1 "
                       "and handled_at is null", referral_id)


async def referral(conn: asyncpg.Connection, referral_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select * from {S}.referrals where referral_id = $1", referral_id)


_INSERT_NOTIFICATION = f"""
    insert into {S}.notifications(
        notification_id, event_id, event_type, cause_event_type, referral_id, case_id,
        recipient, channel, language, subject, body, link, status, attempts, max_attempts,
        sent_at, correlation_id, cause_topic, cause_partition, cause_offset, cause_key, cause_value)
    values($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
           case when $13 = 'sent' then now() end, $16, $17, $18, $19, $20, $21)
    on conflict (notification_id) do nothing"""

# $22 priority, $23-$27 the outbox row (columns of shared.outbox.append), $28-$29 pg_notify.
_INSERT_INAPP = f"""
    with n as ({_INSERT_NOTIFICATION}
        returning notification_id, recipient, event_type, referral_id, case_id),
    a as (
        insert into {S}.alerts(alert_id, recipient, event_type, referral_id, case_id, priority, subject, body, link)
        select notification_id, recipient, event_type, referral_id, case_id, $22, $10, $11, $12 from n
        returning *),
    d as (
        insert into {S}.delivery_attempts(notification_id, attempt, ok) select notification_id, 1, true from n),
    o as (
        insert into {S}.outbox(event_id, topic, key, event_type, envelope)
        select $23, $24, $25, $26, $27::jsonb from n)
    select a.*, pg_notify($28, $29) as notified from a"""


async def insert_pending_deliveries(conn: asyncpg.Connection, rows: list[tuple], *, notify_channel: str) -> None:
    """E-mail/SMS notifications (`_INSERT_NOTIFICATION` arguments) as `pending` rows, in one
    pipelined round trip (idempotent on id), and a NOTIFY on `notify_channel` that wakes the
    delivery loop when the transaction commits."""
    await conn.executemany(_INSERT_NOTIFICATION, rows)
    await conn.execute("select pg_notify($1, '')", notify_channel)


async def insert_inapp_alerts(conn: asyncpg.Connection, rows: list[tuple]) -> list[asyncpg.Record]:
    """In-app notifications: notification, inbox alert, delivery attempt, outbox row and the
    NOTIFY for other replicas' streams in ONE statement per row, all rows in one pipelined round
    trip (the agent is latency-bound on round trips: bench/README.md). Nothing but the
    notification is written when it existed already (every step selects from its insert).
    Returns the new alerts."""
    return await conn.fetchmany(_INSERT_INAPP, rows)


async def claim_due_realerts(conn: asyncpg.Connection, *, after_s: float, limit: int = 50) -> list[asyncpg.Record]:
    """Referrals whose created alert nobody handled within `after_s` and that had no re-alert,
    locked for this transaction (replicas skip each other's)."""
    return await conn.fetch(
        f"""select * from {S}.referrals
            where handled_at is null and realerted_at is null
              and alerted_at <= now() - make_interval(secs => $1)
            order by alerted_at limit $2 for update skip locked""",
        after_s, limit)


async def seconds_until_next_realert(conn: asyncpg.Connection, *, after_s: float) -> float | None:
    """Seconds until the earliest re-alert falls due (what `claim_due_realerts` would claim then;
    negative: due already); None when no referral waits for one."""
    return await conn.fetchval(
        f"""select extract(epoch from min(alerted_at) + make_interval(secs => $1) - now())::float8
            from {S}.referrals where handled_at is null and realerted_at is null""", after_s)


async def mark_realerted(conn: asyncpg.Connection, referral_id: uuid.UUID) -> None:
    await conn.execute(f"update {S}.referrals set realerted_at = now() where referral_id = $1", referral_id)


# --- inbox ---------------------------------------------------------------------------------------


async def alerts_of(conn: asyncpg.Connection, *, recipient: str, unacked_only: bool,
                    limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select * from {S}.alerts where recipient = $1 and (not $2 or acked_at is null)
            order by created_at desc limit $3""", recipient, unacked_only, limit)


async def unacked_count(conn: asyncpg.Connection, *, recipient: str) -> int:
    return await conn.fetchval(
        f"select count(*) from {S}.alerts where recipient = $1 and acked_at is null", recipient)


async def alert(conn: asyncpg.Connection, alert_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select * from {S}.alerts where alert_id = $1", alert_id)


async def lock_alert_of(conn: asyncpg.Connection, *, alert_id: uuid.UUID, recipient: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select * from {S}.alerts where alert_id = $1 and recipient = $2 for update",
                               alert_id, recipient)


async def mark_alert_acked(conn: asyncpg.Connection, alert_id: uuid.UUID) -> asyncpg.Record:
    return await conn.fetchrow(f"update {S}.alerts set acked_at = now() where alert_id = $1 returning *", alert_id)


async def notification(conn: asyncpg.Connection, notification_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select * from {S}.notifications where notification_id = $1", notification_id)


# --- delivery ------------------------------------------------------------------------------------


async def claim_due_deliveries(conn: asyncpg.Connection, *, limit: int, lease_s: float,
                               token: uuid.UUID) -> list[asyncpg.Record]:
    """Due `pending` e-mail/SMS rows, leased to `token` for `lease_s` (replicas skip each
    other's), with the recipient's address read from the directory now."""
    return await conn.fetch(
        f"""update {S}.notifications n set next_attempt_at = now() + make_interval(secs => $2),
                lease_token = $3
            from (select notification_id from {S}.notifications
                  where status = 'pending' and next_attempt_at <= now()
                  order by next_attempt_at limit $1 for update skip locked) due
            where n.notification_id = due.notification_id
            returning n.*,
                (select email from {S}.officers o where o.officer_id = n.recipient) as email,
                (select phone from {S}.officers o where o.officer_id = n.recipient) as phone""",
        limit, lease_s, token)


async def seconds_until_next_delivery(conn: asyncpg.Connection) -> float | None:
    """Seconds until the earliest `pending` row falls due (negative: due already; a leased row
    falls due when its lease ends); None when nothing is pending."""
    return await conn.fetchval(
        f"""select extract(epoch from min(next_attempt_at) - now())::float8 from {S}.notifications
            where status = 'pending'""")


async def renew_leases(conn: asyncpg.Connection, notification_ids: list[uuid.UUID], *, token: uuid.UUID,
                       lease_s: float) -> set[uuid.UUID]:
    """Extend the lease of the rows still held under `token`; returns those."""
    return {r["notification_id"] for r in await conn.fetch(
        f"""update {S}.notifications set next_attempt_at = now() + make_interval(secs => $3)
            where notification_id = any($1::uuid[]) and lease_token = $2 and status = 'pending'
            returning notification_id""", notification_ids, token, lease_s)}


async def lock_if_leased(conn: asyncpg.Connection, notification_id: uuid.UUID, *, token: uuid.UUID) -> bool:
    """Whether the row is still `pending` under `token` (locked for this transaction if so)."""
    return bool(await conn.fetchval(
        f"select true from {S}.notifications where notification_id = $1 and status = 'pending' "
        "and lease_token = $2 for update", notification_id, token))


async def record_attempt(conn: asyncpg.Connection, notification_id: uuid.UUID, *, attempt: int,
                         error: str | None) -> None:
    """Append one delivery attempt (the runtime role may only INSERT here)."""
    await conn.execute(
        f"insert into {S}.delivery_attempts(notification_id, attempt, ok, error) values($1, $2, $3, $4) "
        "on conflict do nothing", notification_id, attempt, error is None, error)


async def mark_sent(conn: asyncpg.Connection, notification_id: uuid.UUID, *, attempt: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""update {S}.notifications set status = 'sent', attempts = $2, sent_at = now(),
            last_error = null where notification_id = $1 and status = 'pending' returning *""",
        notification_id, attempt)


# Sent notifications, a batch in ONE statement (so one round trip and one commit): an attempt row
# each, the `pending` ones marked sent, and the outbox row of each one marked. $1 ids, $2 attempt
# numbers; $3-$7 the outbox rows (columns of shared.outbox.append), in the order of $1.
_RECORD_SENT = f"""
    with v as (select * from unnest($1::uuid[], $2::int[]) with ordinality as v(notification_id, attempt, ord)),
    a as (insert into {S}.delivery_attempts(notification_id, attempt, ok)
          select notification_id, attempt, true from v on conflict do nothing),
    u as (update {S}.notifications n set status = 'sent', attempts = v.attempt, sent_at = now(), last_error = null
          from v where n.notification_id = v.notification_id and n.status = 'pending'
          returning n.notification_id),
    o as (insert into {S}.outbox(event_id, topic, key, event_type, envelope)
          select e.event_id, e.topic, e.key, e.event_type, e.envelope::jsonb
          from unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[]) with ordinality
               as e(event_id, topic, key, event_type, envelope, ord)
          join v using (ord) join u using (notification_id)
          order by e.ord)
    select notification_id from u"""


async def record_sent(conn: asyncpg.Connection, sent: list[tuple[uuid.UUID, int]],
                      outbox_rows: list[tuple[uuid.UUID, str, str, str, str]]) -> set[uuid.UUID]:
    """Record notifications as sent: `sent` is (id, attempt) and `outbox_rows` the outbox row of
    each, in the same order. Only a row still `pending` is marked (and gets its outbox row); the
    ids marked are returned."""
    rows = await conn.fetch(_RECORD_SENT, [n for n, _ in sent], [a for _, a in sent],
                            *(list(col) for col in zip(*outbox_rows)))
    return {r["notification_id"] for r in rows}


async def mark_failed(conn: asyncpg.Connection, notification_id: uuid.UUID, *, attempt: int,
                      error: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""update {S}.notifications set status = 'failed', attempts = $2, failed_at = now(),
            last_error = $3 where notification_id = $1 and status = 'pending' returning *""",
        notification_id, attempt, error)


async def schedule_retry(conn: asyncpg.Connection, notification_id: uuid.UUID, *, attempt: int, error: str,
                         delay_s: float) -> None:
    await conn.execute(
        f"""update {S}.notifications set attempts = $2, last_error = $3,
            next_attempt_at = now() + make_interval(secs => $4)
            where notification_id = $1 and status = 'pending'""",
        notification_id, attempt, error, delay_s)


async def failed_not_dead_lettered(conn: asyncpg.Connection, *, limit: int = 50) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""select * from {S}.notifications where status = 'failed' and dead_lettered_at is null
            order by failed_at limit $1""", limit)


async def mark_dead_lettered(conn: asyncpg.Connection, notification_id: uuid.UUID) -> None:
    await conn.execute(f"update {S}.notifications set dead_lettered_at = now() "
                       "where notification_id = $1", notification_id)

