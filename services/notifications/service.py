"""Use cases of the notifications service (keyword-only functions over an asyncpg connection
or pool). Policy lives in `policy.py`, wording in `templates/`, channels in `channels.py`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from services.notifications import policy
from services.notifications.channels import (
    ChannelSender,
    DeliveryError,
    OutgoingMessage,
    PermanentDeliveryError,
)
from services.notifications.directory import SEED_FILE, Officer, default_language, parse_roster
from services.notifications.render import render
from shared import outbox
from shared.redact import redact_contacts
from shared.db import migrate
from shared.events import (
    Channel,
    Envelope,
    NotificationAcknowledged,
    NotificationFailed,
    NotificationSent,
)
from shared.kafka import DeadLetter, dead_letter
from shared.settings import Environment, Settings
from shared.wakeup import Wakeup
from shared.topics import Topic, Topics

log = logging.getLogger("clms.notifications")

SCHEMA = "notifications"
CONSUMER = "notifications"
SOURCE = "notifications"
MIGRATIONS = Path(__file__).parent / "migrations"
NOTIFY_CHANNEL = "clms_notifications_alert"  # Postgres LISTEN/NOTIFY channel for new inbox alerts
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


def _notification_envelope(model: type, row: dict[str, Any] | asyncpg.Record, **extra: Any) -> Envelope:
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
                            envelope=_notification_envelope(NotificationAcknowledged, n, seconds_to_ack=seconds))
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


async def listen_for_alerts(settings: Settings, pool: asyncpg.Pool, hub: AlertHub) -> None:
    """LISTEN for alerts committed by any replica and feed the hub; reconnects forever."""
    backoff = 0.5
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(settings.require_database())
            pending: asyncio.Queue = asyncio.Queue()
            await conn.add_listener(NOTIFY_CHANNEL, lambda *args: pending.put_nowait(args[3]))
            backoff = 0.5
            while True:
                payload = orjson.loads(await pending.get())
                if hub.wants(payload["recipient"]):
                    alert = await get_alert(pool, alert_id=payload["alert_id"])
                    if alert:
                        hub.publish(alert)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - database away: reconnect
            log.warning("alert listener reconnecting in %.1fs (%s)", backoff, type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(10.0, backoff * 2)
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()


# --- delivery ------------------------------------------------------------------------------------


@dataclass
class _Lease:
    """One claim of the delivery loop: its token and when it ends on this replica's clock."""

    token: uuid.UUID
    valid_until: float  # loop.time()
    lost: set[uuid.UUID] = field(default_factory=set)  # rows whose send was cancelled
    recording: set[uuid.UUID] = field(default_factory=set)  # rows past their send


class DeliveryLoop:
    """Delivers pending e-mail/SMS notifications from the database, so retries survive restarts
    and never hold a partition; failures back off exponentially with jitter up to
    NOTIFY_MAX_ATTEMPTS, then `notification.failed` and a dead letter.

    Leases. A replica claims due rows under a fresh lease token for `lease_s` seconds
    (NOTIFY_LEASE_S; `next_attempt_at` is the end of the lease, so replicas share the work with
    `FOR UPDATE SKIP LOCKED`). While any of them is still waiting for the channel or being sent,
    the lease of those rows is renewed every third of `lease_s`, so a slow SMTP server never lets
    another replica take and send them again. The holder never sends past its lease: a row whose
    renewal finds another token (or none), or whose lease runs out because renewals could not
    reach the database, has its send cancelled before the lease ends (its local deadline is
    measured from before each claim/renewal statement, so it ends before the database's). A failed
    attempt is recorded only under the holder's token; a success is recorded by whoever sent it.
    What remains is the at-least-once window of any SMTP client: a send cancelled (or a process
    killed) after the server took the message and before it answered."""

    def __init__(self, *, pool: asyncpg.Pool, settings: Settings, senders: dict[str, ChannelSender],
                 producer: AIOKafkaProducer, topics: Topics, relay: outbox.OutboxRelay | None = None,
                 batch_size: int = 20, lease_s: float | None = None, metrics: Any = None):
        self.pool = pool
        self.settings = settings
        self.senders = senders
        self.producer = producer
        self.topics = topics
        self.relay = relay
        self.batch_size = batch_size
        self.lease_s = lease_s if lease_s is not None else settings.notify_lease_s
        self.metrics = metrics
        self.lost_leases = 0  # sends cancelled because this replica no longer held the lease
        self._wake = Wakeup()

    def wake(self) -> None:
        self._wake.ring()

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                n = await self.run_once()
                await self.dead_letter_failed()
                backoff = 0.5
                if n < self.batch_size:
                    await self._wake.wait(self.settings.notify_poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database or broker away: try again later
                log.warning("delivery loop paused %.1fs (%s: %s)", backoff, type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(10.0, backoff * 2)

    async def run_once(self) -> int:
        loop = asyncio.get_running_loop()
        token = uuid.uuid4()
        claimed_at = loop.time()  # before the statement: the local lease ends before the database's
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""update {S}.notifications n set next_attempt_at = now() + make_interval(secs => $2),
                        lease_token = $3
                    from (select notification_id from {S}.notifications
                          where status = 'pending' and next_attempt_at <= now()
                          order by next_attempt_at limit $1 for update skip locked) due
                    where n.notification_id = due.notification_id
                    returning n.*,
                        (select email from {S}.officers o where o.officer_id = n.recipient) as email,
                        (select phone from {S}.officers o where o.officer_id = n.recipient) as phone""",
                self.batch_size, self.lease_s, token)
        if rows:
            lease = _Lease(token=token, valid_until=claimed_at + self.lease_s)
            tasks = {r["notification_id"]: asyncio.create_task(self._deliver(r, lease)) for r in rows}
            keeper = asyncio.create_task(self._keep_lease(lease, tasks))
            try:
                await asyncio.wait(tasks.values())
            finally:
                keeper.cancel()
                for t in tasks.values():
                    t.cancel()  # only when run_once itself is cancelled: they are done otherwise
                await asyncio.gather(keeper, *tasks.values(), return_exceptions=True)
            if self.relay:
                self.relay.wake()
        return len(rows)

    async def _keep_lease(self, lease: "_Lease", tasks: dict[uuid.UUID, asyncio.Task]) -> None:
        """Renew the lease of the rows still in flight every third of the lease; cancel the send
        of a row this replica no longer holds, or of every row when the lease is about to end
        without a renewal (database away)."""
        loop = asyncio.get_running_loop()
        every = self.lease_s / 3
        margin = min(self.lease_s / 6, 5.0)
        while True:
            await asyncio.sleep(max(0.0, min(every, lease.valid_until - margin - loop.time())))
            in_flight = [nid for nid, t in tasks.items() if not t.done() and nid not in lease.recording]
            if not in_flight:
                return  # every row is sent (or being recorded): nothing left to hold
            if loop.time() >= lease.valid_until - margin:
                self._give_up(in_flight, tasks, lease, "the lease could not be renewed in time")
                continue
            asked_at = loop.time()
            try:
                async with self.pool.acquire() as conn:
                    kept = {r["notification_id"] for r in await conn.fetch(
                        f"""update {S}.notifications set next_attempt_at = now() + make_interval(secs => $3)
                            where notification_id = any($1::uuid[]) and lease_token = $2 and status = 'pending'
                            returning notification_id""", in_flight, lease.token, self.lease_s)}
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database away: try again before the lease ends
                log.warning("delivery lease not renewed (%s); retrying", type(exc).__name__)
                continue
            lease.valid_until = asked_at + self.lease_s
            lost = [nid for nid in in_flight if nid not in kept and nid not in lease.recording]
            if lost:
                self._give_up(lost, tasks, lease, "another replica holds it now")

    def _give_up(self, ids: list[uuid.UUID], tasks: dict[uuid.UUID, asyncio.Task], lease: "_Lease",
                 why: str) -> None:
        for nid in ids:
            lease.lost.add(nid)
            tasks[nid].cancel()
            self.lost_leases += 1
            log.warning("delivery of notification %s cancelled: %s", nid, why)

    async def _deliver(self, r: asyncpg.Record, lease: "_Lease") -> None:
        sender = self.senders.get(r["channel"])
        message = OutgoingMessage(
            notification_id=str(r["notification_id"]), recipient=r["recipient"], channel=r["channel"],
            address=r["email"] if r["channel"] == "email" else r["phone"], language=r["language"],
            subject=r["subject"], body=r["body"], link=r["link"])
        error: str | None = None
        permanent = False
        try:
            if sender is None:
                raise PermanentDeliveryError(f"no sender for channel {r['channel']!r}")
            await sender.send(message)
        except asyncio.CancelledError:
            if r["notification_id"] in lease.lost:
                return  # not ours any more: the holder of the lease records the attempt
            raise
        except PermanentDeliveryError as exc:
            error, permanent = str(exc), True
        except DeliveryError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - an unexpected sender bug must not stop the loop
            error = f"{type(exc).__name__}: {exc}"[:300]
        if error is not None:  # an SMTP or gateway answer may quote the officer's address
            error = redact_contacts(error)
        lease.recording.add(r["notification_id"])  # from here on the keeper leaves this row alone
        attempt = r["attempts"] + 1
        # A failure is recorded only under this replica's lease token; a success always (the
        # message went out, no one may send it again).
        async with self.pool.acquire() as conn, conn.transaction():
            if error is not None and not await conn.fetchval(
                    f"select true from {S}.notifications where notification_id = $1 and status = 'pending' "
                    "and lease_token = $2 for update", r["notification_id"], lease.token):
                log.info("notification %s attempt not recorded: the lease moved to another replica",
                         r["notification_id"])
                return
            await conn.execute(
                f"insert into {S}.delivery_attempts(notification_id, attempt, ok, error) values($1, $2, $3, $4) "
                "on conflict do nothing", r["notification_id"], attempt, error is None, error)
            if error is None:
                row = await conn.fetchrow(
                    f"""update {S}.notifications set status = 'sent', attempts = $2, sent_at = now(),
                        last_error = null where notification_id = $1 and status = 'pending' returning *""",
                    r["notification_id"], attempt)
                if row:
                    await outbox.append(conn, schema=S, topic=Topic.notification_events,
                                        envelope=_notification_envelope(NotificationSent, row, attempt=attempt))
                self._count("sent", r["channel"])
            elif permanent or attempt >= r["max_attempts"]:
                row = await conn.fetchrow(
                    f"""update {S}.notifications set status = 'failed', attempts = $2, failed_at = now(),
                        last_error = $3 where notification_id = $1 and status = 'pending' returning *""",
                    r["notification_id"], attempt, error)
                if row:
                    await outbox.append(conn, schema=S, topic=Topic.notification_events,
                                        envelope=_notification_envelope(NotificationFailed, row, attempts=attempt,
                                                                        error=error[:500]))
                log.warning("notification %s (%s) failed after %d attempt(s): %s",
                            r["notification_id"], r["channel"], attempt, error)
                self._count("failed", r["channel"])
            else:
                delay = policy.backoff_s(attempt, base_s=self.settings.notify_backoff_base_s,
                                         max_s=self.settings.notify_backoff_max_s, jitter=random.random())
                await conn.execute(
                    f"""update {S}.notifications set attempts = $2, last_error = $3,
                        next_attempt_at = now() + make_interval(secs => $4)
                        where notification_id = $1 and status = 'pending'""",
                    r["notification_id"], attempt, error, delay)
                log.info("notification %s (%s) attempt %d failed, retry in %.1fs: %s",
                         r["notification_id"], r["channel"], attempt, delay, error)
                self._count("retried", r["channel"])

    def _count(self, outcome: str, channel: str) -> None:
        if self.metrics is not None:
            self.metrics.labels(outcome=outcome, channel=channel).inc()

    async def dead_letter_failed(self) -> int:
        """Publish a dead letter for each failed notification not dead-lettered yet."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""select * from {S}.notifications where status = 'failed' and dead_lettered_at is null
                    order by failed_at limit 50""")
            for r in rows:
                letter = DeadLetter(
                    topic=r["cause_topic"] or self.topics.referral_events,
                    partition=r["cause_partition"] if r["cause_partition"] is not None else -1,
                    offset=r["cause_offset"] if r["cause_offset"] is not None else -1,
                    key=(r["cause_key"] or str(r["case_id"])).encode(),
                    value=r["cause_value"] or orjson.dumps({"notification_id": str(r["notification_id"]),
                                                           "cause_event_id": str(r["event_id"])}),
                    reason="delivery_failed",
                    error=(f"notification {r['notification_id']} to {r['recipient']} by {r['channel']} "
                           f"failed after {r['attempts']} attempt(s): {r['last_error']}"),
                    group=self.settings.group_id(CONSUMER),
                )
                await dead_letter(self.producer, self.topics, letter)
                await conn.execute(f"update {S}.notifications set dead_lettered_at = now() "
                                   "where notification_id = $1", r["notification_id"])
        return len(rows)
