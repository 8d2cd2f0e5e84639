"""Use cases of the notifications service (keyword-only functions over an asyncpg connection
or pool). Policy lives in `policy.py`, wording in `templates/`, channels in `channels.py`,
e-mail/SMS delivery in `delivery.py`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from services.notifications import policy
from services.notifications.directory import SEED_FILE, Officer, default_language, parse_roster
from services.notifications.render import render
from shared import outbox
from shared.db import migrate
from shared.events import (
    Channel,
    Envelope,
    NotificationAcknowledged,
    NotificationSent,
)
from shared.settings import Environment, Settings
from shared.topics import Topic

log = logging.getLogger("clms.notifications")

SCHEMA = "notifications"
CONSUMER = "notifications"
SOURCE = "notifications"
MIGRATIONS = Path(__file__).parent / "migrations"
NOTIFY_CHANNEL = "clms_notifications_alert"  # Postgres LISTEN/NOTIFY channel for new inbox alerts
# ... and for new e-mail/SMS rows: it wakes the delivery loop, wherever it runs (its own process by
# default with `clms dev`: services/notifications/delivery.py)
PENDING_CHANNEL = "clms_notifications_pending"
S = SCHEMA


# --- officer directory ---------------------------------------------------------------------------


async def upsert_officers(conn: asyncpg.Connection, officers: list[Officer]) -> dict[str, int]:
    """Add or update officers by officer_id (one transaction)."""
    async with conn.transaction():
        existing = {r["officer_id"] for r in await conn.fetch(
            f"select officer_id from {S}.officers where officer_id = any($1::text[])",
            [o.officer_id for o in officers])}
        await conn.executemany(
            f"""insert into {S}.officers(officer_id, agency, municipality, office_id, role, language,
                                         email, phone, inapp, on_duty)
                values($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                on conflict (officer_id) do update set
                    agency = excluded.agency, municipality = excluded.municipality,
                    office_id = excluded.office_id, role = excluded.role, language = excluded.language,
                    email = excluded.email, phone = excluded.phone, inapp = excluded.inapp,
                    on_duty = excluded.on_duty, updated_at = now()""",
            [(o.officer_id, o.agency, o.municipality, o.office_id, o.role, o.language, o.email,
              o.phone, o.inapp, o.on_duty) for o in officers],
        )
    return {"inserted": len(officers) - len(existing), "updated": len(existing)}


async def seed_if_empty(conn: asyncpg.Connection, *, seed_file: Path = SEED_FILE) -> int:
    """Load the development seed when the directory is empty; returns the officers loaded."""
    if await conn.fetchval(f"select exists(select 1 from {S}.officers)"):
        return 0
    officers = parse_roster(seed_file.read_text(encoding="utf-8"))
    await upsert_officers(conn, officers)
    log.info("seeded the officer directory with %d officers from %s", len(officers), seed_file.name)
    return len(officers)


async def seed_development_roster(conn: asyncpg.Connection, *, settings: Settings) -> int:
    """The development seed (every office's duty officer and supervisor, every coordinator), never
    with CLMS_ENV=production: there the roster comes from `clms officers import`."""
    if settings.environment is Environment.production:
        log.info("CLMS_ENV=production: the development officer roster is not seeded; import the real "
                 "roster with `clms officers import`")
        return 0
    return await seed_if_empty(conn)


async def import_roster(settings: Settings, officers: list[Officer]) -> dict[str, int]:
    """`clms officers import`: migrate the schema if needed, then upsert the roster."""
    conn = await asyncpg.connect(settings.require_database())
    try:
        await migrate(conn, schema=SCHEMA, folder=MIGRATIONS)
        return await upsert_officers(conn, officers)
    finally:
        await conn.close()


async def list_officers(settings: Settings, *, municipality: str | None = None,
                        office_id: str | None = None) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.require_database())
    try:
        await migrate(conn, schema=SCHEMA, folder=MIGRATIONS)
        return await conn.fetch(
            f"""select * from {S}.officers where ($1::text is null or municipality = $1)
                and ($2::text is null or office_id = $2) order by office_id, role, officer_id""",
            municipality, office_id)
    finally:
        await conn.close()


def _contact(r: asyncpg.Record) -> policy.Contact:
    return policy.Contact(officer_id=r["officer_id"], role=r["role"], language=r["language"],
                          email=bool(r["email"]), phone=bool(r["phone"]), inapp=r["inapp"],
                          on_duty=r["on_duty"], office_id=r["office_id"])


async def resolve(conn: asyncpg.Connection, audiences: list[policy.Audience], *,
                  municipality: str) -> list[policy.Contact]:
    """Look up the officers of each audience (policy.select decides who belongs)."""
    offices = [a.key for a in audiences if a.kind in ("office_on_duty", "office_supervisor")]
    subjects = [a.key for a in audiences if a.kind == "officer"]
    rows = await conn.fetch(
        f"select * from {S}.officers where office_id = any($1::text[]) or officer_id = any($2::text[])",
        offices, subjects)
    return _select(audiences, [_contact(r) for r in rows], municipality=municipality)


def _select(audiences: list[policy.Audience], directory: list[policy.Contact], *,
            municipality: str) -> list[policy.Contact]:
    """The officers of each audience among `directory` (a slice that holds every one of them)."""
    out: list[policy.Contact] = []
    for a in audiences:
        found = policy.select(a, directory)
        if not found and a.kind == "officer":
            found = [policy.unknown_officer(a.key, default_language(municipality))]
        out.extend(found)
    return out


# --- recording events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cause:
    """Where the cause event came from, for a dead letter if delivery finally fails."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def notification_envelope(model: type, row: dict[str, Any] | asyncpg.Record, **extra: Any) -> Envelope:
    data = model(notification_id=row["notification_id"], referral_id=row["referral_id"],
                 case_id=row["case_id"], channel=Channel(row["channel"]),
                 cause_event_type=row["cause_event_type"], **extra)
    return Envelope.wrap(data, source=SOURCE, subject=str(row["case_id"]),
                         correlationid=row["correlation_id"], causationid=row["event_id"])


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


def _notification_args(
    *, settings: Settings, planned: list[policy.Planned], event_id: uuid.UUID, template: str,
    cause_event_type: str, facts: dict[str, Any], correlation_id: str, cause: Cause | None,
    plain: list[tuple], inapp: list[tuple],
) -> None:
    """The statement arguments of one event's notifications: e-mail/SMS rows (`_INSERT_NOTIFICATION`,
    delivered later by the DeliveryLoop) go to `plain`, in-app ones (`_INSERT_INAPP`) to `inapp`."""
    rendered: dict[str, Any] = {}  # the same words on every channel: rendered once per language
    for p in planned:
        msg = rendered.get(p.language)
        if msg is None:
            msg = rendered[p.language] = render(template, p.language, facts, base_url=settings.workspace_url)
        is_inapp = p.channel == "inapp"
        args = (
            p.notification_id, event_id, template, cause_event_type, facts.get("referral_id"),
            facts.get("case_id"), p.recipient, p.channel, p.language, msg.subject, msg.body, msg.link,
            "sent" if is_inapp else "pending", 1 if is_inapp else 0, settings.notify_max_attempts,
            correlation_id, cause.topic if cause else None, cause.partition if cause else None,
            cause.offset if cause else None,
            cause.key.decode(errors="replace") if cause and cause.key else None,
            cause.value if cause else None,
        )
        if not is_inapp:
            plain.append(args)
            continue
        # In-app: notification, inbox alert, delivery attempt, outbox row and the NOTIFY for other
        # replicas' streams in ONE statement (the agent is latency-bound on round trips:
        # bench/README.md, Performance). Nothing but the notification is written when it existed
        # already (every step selects from its insert).
        sent = Envelope.wrap(
            NotificationSent(notification_id=p.notification_id, referral_id=facts.get("referral_id"),
                             case_id=facts.get("case_id"), channel=Channel.inapp,
                             cause_event_type=cause_event_type, attempt=1),
            source=SOURCE, subject=str(facts.get("case_id")), correlationid=correlation_id, causationid=event_id)
        inapp.append((*args, facts.get("priority"), sent.id, Topic.notification_events.value, sent.subject,
                      sent.type, sent.to_json_bytes().decode(), NOTIFY_CHANNEL,
                      orjson.dumps({"alert_id": str(p.notification_id), "recipient": p.recipient}).decode()))


async def _write_notifications(conn: asyncpg.Connection, plain: list[tuple], inapp: list[tuple]
                               ) -> list[dict[str, Any]]:
    """Insert the notifications (idempotent on id), each kind in one pipelined round trip.
    Returns the new in-app alerts (for the SSE fan-out after commit)."""
    if plain:
        await conn.executemany(_INSERT_NOTIFICATION, plain)
        await conn.execute("select pg_notify($1, '')", PENDING_CHANNEL)  # delivered on commit
    if not inapp:
        return []
    return [alert_dict(r) for r in await conn.fetchmany(_INSERT_INAPP, inapp)]


async def _create_notifications(
    conn: asyncpg.Connection, *, settings: Settings, planned: list[policy.Planned], event_id: uuid.UUID,
    template: str, cause_event_type: str, facts: dict[str, Any], correlation_id: str,
    cause: Cause | None,
) -> list[dict[str, Any]]:
    """Insert notifications (idempotent on id); in-app ones become inbox alerts at once.
    Returns the new alerts (for the SSE fan-out after commit)."""
    plain: list[tuple] = []
    inapp: list[tuple] = []
    _notification_args(settings=settings, planned=planned, event_id=event_id, template=template,
                       cause_event_type=cause_event_type, facts=facts, correlation_id=correlation_id,
                       cause=cause, plain=plain, inapp=inapp)
    return await _write_notifications(conn, plain, inapp)


_INSERT_REFERRAL = f"""
    insert into {S}.referrals(referral_id, case_id, municipality, agency, office_id, reported_by,
        priority, deadline, age_band, sector, created_event_id, correlation_id)
    values($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    on conflict (referral_id) do nothing"""


def _referral_args(envelope: Envelope, data: dict[str, Any]) -> tuple:
    return (uuid.UUID(data["referral_id"]), uuid.UUID(data["case_id"]), data["municipality"], data["agency"],
            data["office_id"], data["reported_by"], data["priority"], envelope.data.deadline, data["age_band"],
            data["sector"], envelope.id, envelope.correlationid)


async def record_events(conn: asyncpg.Connection, *, items: list[tuple[Envelope, Cause | None]],
                        settings: Settings) -> list[dict[str, Any]]:
    """Apply several referral events, in order, inside the caller's transaction: what
    `record_event` does for each, with each run of consecutive `referral.created` events (the
    bulk of the stream: two per identification) in a few pipelined statements for the whole run
    instead of ~8 round trips per event. All or nothing with the caller's transaction: an error
    leaves none of them applied (the worker then applies them one by one, so only a bad event is
    dead-lettered). Returns the new in-app alerts."""
    alerts: list[dict[str, Any]] = []
    run: list[tuple[Envelope, Cause | None]] = []
    for envelope, cause in items:
        if envelope.type == policy.CREATED:
            run.append((envelope, cause))
            continue
        if run:
            alerts += await _record_created(conn, items=run, settings=settings)
            run = []
        alerts += await record_event(conn, envelope=envelope, settings=settings, cause=cause)
    if run:
        alerts += await _record_created(conn, items=run, settings=settings)
    return alerts


async def _record_created(conn: asyncpg.Connection, *, items: list[tuple[Envelope, Cause | None]],
                          settings: Settings) -> list[dict[str, Any]]:
    """`record_event` for consecutive `referral.created` events, with the same result: one inbox
    claim statement for all (an event claimed before, or twice in the run, is applied once),
    their referral rows, one directory lookup for their offices, then every notification in
    two pipelined statements. (The facts of a created event are its own data; its audience is
    its office's duty officers, so neither needs the stored referral row.)"""
    claimed = {r["event_id"] for r in await conn.fetch(
        f"""insert into {S}.inbox(event_id, consumer, event_type)
            select id, $2, $3 from unnest($1::uuid[]) as id
            on conflict do nothing returning event_id""",
        [e.id for e, _ in items], CONSUMER, policy.CREATED)}
    fresh: list[tuple[Envelope, Cause | None, dict[str, Any]]] = []
    for envelope, cause in items:
        if envelope.id in claimed:
            claimed.discard(envelope.id)  # a second copy in the same run is not applied again
            fresh.append((envelope, cause, envelope.data.model_dump(mode="json")))
    if not fresh:
        return []
    await conn.executemany(_INSERT_REFERRAL, [_referral_args(e, d) for e, _, d in fresh])
    offices = sorted({d["office_id"] for _, _, d in fresh})
    directory = [_contact(r) for r in await conn.fetch(
        f"select * from {S}.officers where office_id = any($1::text[])", offices)]
    plain: list[tuple] = []
    inapp: list[tuple] = []
    for envelope, cause, data in fresh:
        facts: dict[str, Any] = dict(data)
        facts["referral_id"], facts["case_id"] = uuid.UUID(data["referral_id"]), uuid.UUID(data["case_id"])
        audiences = policy.audiences(envelope.type, office_id=data["office_id"], municipality=data["municipality"],
                                     reported_by=data["reported_by"])
        recipients = _select(audiences, directory, municipality=data["municipality"])
        planned = policy.plan(envelope.id, envelope.type, recipients, priority=facts.get("priority"))
        if not planned:
            log.warning("no recipient for %s %s (office %s)", envelope.type, envelope.id, data["office_id"])
        _notification_args(settings=settings, planned=planned, event_id=envelope.id, template=envelope.type,
                           cause_event_type=envelope.type, facts=facts, correlation_id=envelope.correlationid,
                           cause=cause, plain=plain, inapp=inapp)
    return await _write_notifications(conn, plain, inapp)


async def record_event(conn: asyncpg.Connection, *, envelope: Envelope, settings: Settings,
                       cause: Cause | None = None) -> list[dict[str, Any]]:
    """Apply one referral event inside the caller's transaction: claim it in the inbox, keep
    what later events need, and record one notification per recipient and channel.
    Returns the new in-app alerts; [] when the event had been applied already."""
    if not envelope.type.startswith("referral."):
        return []
    if not await outbox.claim(conn, schema=S, consumer=CONSUMER, envelope=envelope):
        return []
    data = envelope.data.model_dump(mode="json")
    referral_id = uuid.UUID(data["referral_id"])
    if envelope.type == policy.CREATED:
        await conn.execute(_INSERT_REFERRAL, *_referral_args(envelope, data))
    elif envelope.type in policy.HANDLED:
        await conn.execute(f"update {S}.referrals set handled_at = now() where referral_id = $1 "
                           "and handled_at is null", referral_id)
    ref = await conn.fetchrow(f"select * from {S}.referrals where referral_id = $1", referral_id)
    facts: dict[str, Any] = {}
    if ref is not None:
        facts.update({k: ref[k] for k in ("priority", "deadline", "age_band", "sector")})
    facts.update(data)
    facts["referral_id"], facts["case_id"] = referral_id, uuid.UUID(data["case_id"])
    if envelope.type not in policy.TEMPLATED:
        return []
    audiences = policy.audiences(envelope.type, office_id=data["office_id"], municipality=data["municipality"],
                                 reported_by=ref["reported_by"] if ref else None,
                                 escalated_to=data.get("escalated_to"))
    recipients = await resolve(conn, audiences, municipality=data["municipality"])
    planned = policy.plan(envelope.id, envelope.type, recipients, priority=facts.get("priority"))
    if not planned:
        log.warning("no recipient for %s %s (office %s)", envelope.type, envelope.id, data["office_id"])
    return await _create_notifications(
        conn, settings=settings, planned=planned, event_id=envelope.id, template=envelope.type,
        cause_event_type=envelope.type, facts=facts, correlation_id=envelope.correlationid, cause=cause)


async def realert_due(pool: asyncpg.Pool, *, settings: Settings) -> list[dict[str, Any]]:
    """Re-send, once, each referral.created alert nobody handled within REALERT_AFTER_S, to the
    office supervisor. Returns the new in-app alerts."""
    alerts: list[dict[str, Any]] = []
    async with pool.acquire() as conn, conn.transaction():
        due = await conn.fetch(
            f"""select * from {S}.referrals
                where handled_at is null and realerted_at is null
                  and alerted_at <= now() - make_interval(secs => $1)
                order by alerted_at limit 50 for update skip locked""",
            settings.realert_after_s)
        for ref in due:
            await conn.execute(f"update {S}.referrals set realerted_at = now() where referral_id = $1",
                               ref["referral_id"])
            event_id = policy.realert_event_id(ref["created_event_id"])
            audiences = policy.audiences(policy.REALERT, office_id=ref["office_id"],
                                         municipality=ref["municipality"], reported_by=None)
            recipients = await resolve(conn, audiences, municipality=ref["municipality"])
            planned = policy.plan(event_id, policy.REALERT, recipients, priority=ref["priority"])
            facts = {k: ref[k] for k in ("referral_id", "case_id", "municipality", "agency", "office_id",
                                         "priority", "deadline", "age_band", "sector")}
            alerts += await _create_notifications(
                conn, settings=settings, planned=planned, event_id=event_id, template=policy.REALERT,
                cause_event_type=policy.CREATED, facts=facts, correlation_id=ref["correlation_id"] or str(event_id),
                cause=None)
            log.info("re-alerted supervisor of %s for referral %s", ref["office_id"], ref["referral_id"])
    return alerts


# --- inbox ---------------------------------------------------------------------------------------


def alert_dict(r: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(r["alert_id"]),
        "event_type": r["event_type"],
        "referral_id": str(r["referral_id"]) if r["referral_id"] else None,
        "case_id": str(r["case_id"]) if r["case_id"] else None,
        "priority": r["priority"],
        "subject": r["subject"],
        "body": r["body"],
        "link": r["link"],
        "created_at": r["created_at"].isoformat(),
        "acked_at": r["acked_at"].isoformat() if r["acked_at"] else None,
        "recipient": r["recipient"],
    }


async def list_inbox(pool: asyncpg.Pool, *, recipient: str, unacked_only: bool = False,
                     limit: int = 50) -> dict[str, Any]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"""select * from {S}.alerts where recipient = $1 and (not $2 or acked_at is null)
                order by created_at desc limit $3""", recipient, unacked_only, limit)
        unacked = await conn.fetchval(
            f"select count(*) from {S}.alerts where recipient = $1 and acked_at is null", recipient)
    return {"items": [alert_dict(r) for r in rows], "unacked": unacked}


async def get_alert(pool: asyncpg.Pool, *, alert_id: uuid.UUID | str) -> dict[str, Any] | None:
    async with pool.acquire() as conn:
        r = await conn.fetchrow(f"select * from {S}.alerts where alert_id = $1", uuid.UUID(str(alert_id)))
    return alert_dict(r) if r else None


async def ack_alert(pool: asyncpg.Pool, *, alert_id: uuid.UUID, recipient: str) -> dict[str, Any] | None:
    """Acknowledge one of the caller's alerts (idempotent). None when it is not theirs or absent:
    the caller answers 404 either way, so ids of others' alerts reveal nothing."""
    async with pool.acquire() as conn, conn.transaction():
        r = await conn.fetchrow(f"select * from {S}.alerts where alert_id = $1 and recipient = $2 for update",
                                alert_id, recipient)
        if r is None:
            return None
        if r["acked_at"] is not None:
            return alert_dict(r)
        r = await conn.fetchrow(f"update {S}.alerts set acked_at = now() where alert_id = $1 returning *", alert_id)
        n = await conn.fetchrow(f"select * from {S}.notifications where notification_id = $1", alert_id)
        seconds = max(0.0, (r["acked_at"] - r["created_at"]).total_seconds())
        await outbox.append(conn, schema=S, topic=Topic.notification_events,
                            envelope=notification_envelope(NotificationAcknowledged, n, seconds_to_ack=seconds))
        if n["cause_event_type"] == policy.CREATED and r["referral_id"]:
            await conn.execute(f"update {S}.referrals set handled_at = now() where referral_id = $1 "
                               "and handled_at is null", r["referral_id"])
    return alert_dict(r)


class AlertHub:
    """In-process fan-out of new inbox alerts to SSE subscribers, keyed by officer subject.
    Fed by the worker after its commit and by Postgres NOTIFY (other replicas); an alert seen
    twice is pushed once."""

    def __init__(self, *, queue_size: int = 100, remember: int = 5000):
        self._subs: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._queue_size = queue_size
        self._remember = remember

    def subscribe(self, recipient: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(self._queue_size)
        self._subs[recipient].add(q)
        return q

    def unsubscribe(self, recipient: str, q: asyncio.Queue) -> None:
        self._subs[recipient].discard(q)
        if not self._subs[recipient]:
            del self._subs[recipient]

    def wants(self, recipient: str) -> bool:
        return recipient in self._subs

    @property
    def subscribers(self) -> int:
        return sum(len(v) for v in self._subs.values())

    def publish(self, alert: dict[str, Any]) -> bool:
        if alert["id"] in self._seen:
            return False
        self._seen[alert["id"]] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        for q in list(self._subs.get(alert["recipient"], ())):
            if q.full():  # a stalled client loses its oldest alert, not the whole stream
                q.get_nowait()
            q.put_nowait(alert)
        return True


async def listen(settings: Settings, channel: str, handle: Callable[[str], Awaitable[None]]) -> None:
    """LISTEN on the Postgres `channel` and await `handle(payload)` for each notification, in
    order, on a connection of its own; reconnects forever."""
    backoff = 0.5
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(settings.require_database())
            pending: asyncio.Queue = asyncio.Queue()
            await conn.add_listener(channel, lambda *args: pending.put_nowait(args[3]))
            backoff = 0.5
            while True:
                await handle(await pending.get())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - database away: reconnect
            log.warning("listener on %s reconnecting in %.1fs (%s)", channel, backoff, type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(10.0, backoff * 2)
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()


async def listen_for_alerts(settings: Settings, pool: asyncpg.Pool, hub: AlertHub) -> None:
    """LISTEN for alerts committed by any replica and feed the hub; reconnects forever."""
    async def feed(raw: str) -> None:
        payload = orjson.loads(raw)
        if hub.wants(payload["recipient"]):
            alert = await get_alert(pool, alert_id=payload["alert_id"])
            if alert:
                hub.publish(alert)

    await listen(settings, NOTIFY_CHANNEL, feed)
