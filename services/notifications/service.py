"""Use cases of the notifications service: keyword-only functions that read as their steps.
Who gets what is decided in `rules.py`, the wording in `templates/` (`render.py`), the SQL in
`store.py`; e-mail/SMS go out from `delivery.py`. Errors are `shared.errors`."""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from services.notifications import rules, store
from services.notifications.deps import Deps
from services.notifications.directory import SEED_FILE, Officer, default_language, parse_roster
from services.notifications.render import render
from services.notifications.store import MIGRATIONS, SCHEMA
from shared import access, outbox
from shared.auth import Claims
from shared.db import migrate
from shared.errors import Forbidden, NotFound
from shared.events import Channel, Envelope, NotificationAcknowledged, NotificationSent
from shared.settings import Environment, Settings
from shared.topics import Topic

__all__ = ["MIGRATIONS", "SCHEMA"]  # re-exported: where the schema and its migrations are

log = logging.getLogger("clms.notifications")

CONSUMER = "notifications"
SOURCE = "notifications"
NOTIFY_CHANNEL = "clms_notifications_alert"  # Postgres LISTEN/NOTIFY channel for new inbox alerts
# ... and for new e-mail/SMS rows: it wakes the delivery loop, wherever it runs (its own process by
# default with `clms dev`: services/notifications/delivery.py)
PENDING_CHANNEL = "clms_notifications_pending"


# --- officer directory ---------------------------------------------------------------------------


async def upsert_officers(conn: asyncpg.Connection, officers: list[Officer]) -> dict[str, int]:
    """Add or update officers by officer_id (one transaction)."""
    async with conn.transaction():
        existing = await store.known_officer_ids(conn, [o.officer_id for o in officers])
        await store.upsert_officers(conn, [(o.officer_id, o.agency, o.municipality, o.office_id, o.role, o.language,
                                            o.email, o.phone, o.inapp, o.on_duty) for o in officers])
    return {"inserted": len(officers) - len(existing), "updated": len(existing)}


async def seed_if_empty(conn: asyncpg.Connection, *, seed_file: Path = SEED_FILE) -> int:
    """Load the development seed when the directory is empty; returns the officers loaded."""
    if not await store.directory_is_empty(conn):
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
        return await store.officers(conn, municipality=municipality, office_id=office_id)
    finally:
        await conn.close()


async def resolve(conn: asyncpg.Connection, audiences: list[rules.Audience], *,
                  municipality: str) -> list[rules.Contact]:
    """Look up the officers of each audience (rules.select decides who belongs)."""
    directory = await store.contacts(conn, offices=[a.key for a in audiences if a.kind in ("office_on_duty",
                                                                                           "office_supervisor")],
                                     officer_ids=[a.key for a in audiences if a.kind == "officer"])
    return rules.recipients(audiences, directory, fallback_language=default_language(municipality))


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


@dataclass
class _Rows:
    """The statement arguments of the notifications to write: e-mail/SMS (`pending`, sent later
    by the delivery loop) and in-app (written with their inbox alert)."""

    plain: list[tuple]
    inapp: list[tuple]


def _notification_rows(
    rows: _Rows, *, settings: Settings, planned: list[rules.Planned], event_id: uuid.UUID, template: str,
    cause_event_type: str, facts: dict[str, Any], correlation_id: str, cause: Cause | None,
) -> None:
    """Add the rows of one event's notifications to `rows`, each message rendered once per language
    (the same words on every channel)."""
    rendered: dict[str, Any] = {}
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
            rows.plain.append(args)
            continue
        sent = Envelope.wrap(
            NotificationSent(notification_id=p.notification_id, referral_id=facts.get("referral_id"),
                             case_id=facts.get("case_id"), channel=Channel.inapp,
                             cause_event_type=cause_event_type, attempt=1),
            source=SOURCE, subject=str(facts.get("case_id")), correlationid=correlation_id, causationid=event_id)
        rows.inapp.append((*args, facts.get("priority"), sent.id, Topic.notification_events.value, sent.subject,
                           sent.type, sent.to_json_bytes().decode(), NOTIFY_CHANNEL,
                           orjson.dumps({"alert_id": str(p.notification_id), "recipient": p.recipient}).decode()))


async def _write(conn: asyncpg.Connection, rows: _Rows) -> list[dict[str, Any]]:
    """Insert the notifications (idempotent on id), each kind in one pipelined round trip.
    Returns the new in-app alerts (for the SSE fan-out after commit)."""
    if rows.plain:
        await store.insert_pending_deliveries(conn, rows.plain, notify_channel=PENDING_CHANNEL)
    if not rows.inapp:
        return []
    return [alert_dict(r) for r in await store.insert_inapp_alerts(conn, rows.inapp)]


def _referral_row(envelope: Envelope, data: dict[str, Any]) -> tuple:
    return (uuid.UUID(data["referral_id"]), uuid.UUID(data["case_id"]), data["municipality"], data["agency"],
            data["office_id"], data["reported_by"], data["priority"], envelope.data.deadline, data["age_band"],
            data["sector"], envelope.id, envelope.correlationid)


def _plan(envelope: Envelope, data: dict[str, Any], recipients: list[rules.Contact],
          priority: str | None) -> list[rules.Planned]:
    planned = rules.plan(envelope.id, envelope.type, recipients, priority=priority)
    if not planned:
        log.warning("no recipient for %s %s (office %s)", envelope.type, envelope.id, data["office_id"])
    return planned


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
        if envelope.type == rules.CREATED:
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
    claimed = await store.claim_events(conn, [e.id for e, _ in items], consumer=CONSUMER,
                                       event_type=rules.CREATED)
    fresh: list[tuple[Envelope, Cause | None, dict[str, Any]]] = []
    for envelope, cause in items:
        if envelope.id in claimed:
            claimed.discard(envelope.id)  # a second copy in the same run is not applied again
            fresh.append((envelope, cause, envelope.data.model_dump(mode="json")))
    if not fresh:
        return []
    await store.insert_referrals(conn, [_referral_row(e, d) for e, _, d in fresh])
    directory = await store.contacts(conn, offices=sorted({d["office_id"] for _, _, d in fresh}))
    rows = _Rows([], [])
    for envelope, cause, data in fresh:
        facts: dict[str, Any] = dict(data)
        facts["referral_id"], facts["case_id"] = uuid.UUID(data["referral_id"]), uuid.UUID(data["case_id"])
        audiences = rules.audiences(envelope.type, office_id=data["office_id"], municipality=data["municipality"],
                                    reported_by=data["reported_by"])
        recipients = rules.recipients(audiences, directory, fallback_language=default_language(data["municipality"]))
        _notification_rows(rows, settings=settings, planned=_plan(envelope, data, recipients, facts.get("priority")),
                           event_id=envelope.id, template=envelope.type, cause_event_type=envelope.type,
                           facts=facts, correlation_id=envelope.correlationid, cause=cause)
    return await _write(conn, rows)


async def record_event(conn: asyncpg.Connection, *, envelope: Envelope, settings: Settings,
                       cause: Cause | None = None) -> list[dict[str, Any]]:
    """Apply one referral event inside the caller's transaction: claim it in the inbox, keep
    what later events need, and record one notification per recipient and channel.
    Returns the new in-app alerts; [] when the event had been applied already."""
    if not envelope.type.startswith("referral."):
        return []
    if not await outbox.claim(conn, schema=SCHEMA, consumer=CONSUMER, envelope=envelope):
        return []
    data = envelope.data.model_dump(mode="json")
    referral_id = uuid.UUID(data["referral_id"])
    if envelope.type == rules.CREATED:
        await store.insert_referrals(conn, [_referral_row(envelope, data)])
    elif envelope.type in rules.HANDLED:
        await store.mark_referral_handled(conn, referral_id)
    ref = await store.referral(conn, referral_id)
    facts: dict[str, Any] = {}
    if ref is not None:
        facts.update({k: ref[k] for k in ("priority", "deadline", "age_band", "sector")})
    facts.update(data)
    facts["referral_id"], facts["case_id"] = referral_id, uuid.UUID(data["case_id"])
    if envelope.type not in rules.TEMPLATED:
        return []
    audiences = rules.audiences(envelope.type, office_id=data["office_id"], municipality=data["municipality"],
                                reported_by=ref["reported_by"] if ref else None,
                                escalated_to=data.get("escalated_to"))
    recipients = await resolve(conn, audiences, municipality=data["municipality"])
    rows = _Rows([], [])
    _notification_rows(rows, settings=settings, planned=_plan(envelope, data, recipients, facts.get("priority")),
                       event_id=envelope.id, template=envelope.type, cause_event_type=envelope.type, facts=facts,
                       correlation_id=envelope.correlationid, cause=cause)
    return await _write(conn, rows)


async def realert_due(pool: asyncpg.Pool, *, settings: Settings) -> list[dict[str, Any]]:
    """Re-send, once, each referral.created alert nobody handled within REALERT_AFTER_S, to the
    office supervisor. Returns the new in-app alerts."""
    rows = _Rows([], [])
    async with pool.acquire() as conn, conn.transaction():
        for ref in await store.claim_due_realerts(conn, after_s=settings.realert_after_s):
            await store.mark_realerted(conn, ref["referral_id"])
            event_id = rules.realert_event_id(ref["created_event_id"])
            audiences = rules.audiences(rules.REALERT, office_id=ref["office_id"],
                                        municipality=ref["municipality"], reported_by=None)
            recipients = await resolve(conn, audiences, municipality=ref["municipality"])
            facts = {k: ref[k] for k in ("referral_id", "case_id", "municipality", "agency", "office_id",
                                         "priority", "deadline", "age_band", "sector")}
            _notification_rows(
                rows, settings=settings, planned=rules.plan(event_id, rules.REALERT, recipients, priority=ref["priority"]),
                event_id=event_id, template=rules.REALERT, cause_event_type=rules.CREATED, facts=facts,
                correlation_id=ref["correlation_id"] or str(event_id), cause=None)
            log.info("re-alerted supervisor of %s for referral %s", ref["office_id"], ref["referral_id"])
        return await _write(conn, rows)


# --- the worker's use cases: apply, then tell this replica's streams, relay and delivery ----------


def publish_alerts(deps: Deps, alerts: list[dict[str, Any]]) -> None:
    """After a commit: push the new alerts to this replica's streams, wake the relay (their
    outbox rows) and the delivery loop when it runs here."""
    for a in alerts:
        deps.hub.publish(a)
    deps.metrics.alerts.inc(len(alerts))
    deps.relay.wake()
    if deps.delivery is not None:
        deps.delivery.wake()


async def apply_event(deps: Deps, envelope: Envelope, *, cause: Cause) -> None:
    async with deps.pool.acquire() as conn, conn.transaction():
        alerts = await record_event(conn, envelope=envelope, settings=deps.settings, cause=cause)
    publish_alerts(deps, alerts)
    deps.realerts.referral_recorded()  # not from a re-alert round: it would ring itself forever


async def apply_events(deps: Deps, items: list[tuple[Envelope, Cause]]) -> None:
    async with deps.pool.acquire() as conn, conn.transaction():
        alerts = await record_events(conn, items=items, settings=deps.settings)
    publish_alerts(deps, alerts)
    deps.realerts.referral_recorded()


async def realert(deps: Deps) -> float | None:
    """One re-alert round; returns the seconds until the next re-alert falls due (None: no
    referral waits for one)."""
    publish_alerts(deps, await realert_due(deps.pool, settings=deps.settings))
    async with deps.pool.acquire() as conn:
        return await store.seconds_until_next_realert(conn, after_s=deps.settings.realert_after_s)


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


def require_own_inbox(claims: Claims) -> None:
    """The inbox is the caller's own (shared/access_policy.yaml, inbox.read)."""
    decision = access.allowed(claims, "inbox.read", access.Resource(owner=claims.sub))
    if not decision:
        raise Forbidden(decision.reason)


async def list_inbox(deps: Deps, *, claims: Claims, unacked_only: bool = False, limit: int = 50) -> dict[str, Any]:
    require_own_inbox(claims)
    async with deps.pool.acquire() as conn:
        rows = await store.alerts_of(conn, recipient=claims.sub, unacked_only=unacked_only, limit=limit)
        unacked = await store.unacked_count(conn, recipient=claims.sub)
    return {"items": [alert_dict(r) for r in rows], "unacked": unacked}


async def get_alert(pool: asyncpg.Pool, *, alert_id: uuid.UUID | str) -> dict[str, Any] | None:
    async with pool.acquire() as conn:
        r = await store.alert(conn, uuid.UUID(str(alert_id)))
    return alert_dict(r) if r else None


async def ack_alert(deps: Deps, *, claims: Claims, alert_id: uuid.UUID) -> dict[str, Any]:
    """Acknowledge one of the caller's alerts (idempotent). Someone else's alert and an unknown id
    are both NotFound, so ids of others' alerts reveal nothing."""
    require_own_inbox(claims)
    async with deps.pool.acquire() as conn, conn.transaction():
        r = await store.lock_alert_of(conn, alert_id=alert_id, recipient=claims.sub)
        if r is None:
            raise NotFound(f"alert_id: no alert {alert_id} in your inbox")
        if r["acked_at"] is not None:
            return alert_dict(r)
        r = await store.mark_alert_acked(conn, alert_id)
        n = await store.notification(conn, alert_id)
        seconds = max(0.0, (r["acked_at"] - r["created_at"]).total_seconds())
        await outbox.append(conn, schema=SCHEMA, topic=Topic.notification_events,
                            envelope=notification_envelope(NotificationAcknowledged, n, seconds_to_ack=seconds))
        if n["cause_event_type"] == rules.CREATED and r["referral_id"]:
            await store.mark_referral_handled(conn, r["referral_id"])
    deps.relay.wake()
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


async def listen(settings: Settings, channel: str, handle: Callable[[str], Awaitable[None]], *,
                 listening: Callable[[], None] | None = None) -> None:
    """LISTEN on the Postgres `channel` and await `handle(payload)` for each notification, in
    order, on a connection of its own; reconnects forever. `listening()` is called each time the
    LISTEN is in place (at start and after a reconnect: a NOTIFY sent while it was away is lost,
    so the caller looks at the database once then)."""
    backoff = 0.5
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(settings.require_database())
            pending: asyncio.Queue = asyncio.Queue()
            await conn.add_listener(channel, lambda *args: pending.put_nowait(args[3]))
            backoff = 0.5
            if listening is not None:
                listening()
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


async def listen_for_alerts(settings: Settings, pool: asyncpg.Pool, hub: AlertHub, *,
                            listening: Callable[[], None] | None = None) -> None:
    """LISTEN for alerts committed by any replica and feed the hub; reconnects forever
    (`listening`: as for `listen`)."""
    async def feed(raw: str) -> None:
        payload = orjson.loads(raw)
        if hub.wants(payload["recipient"]):
            alert = await get_alert(pool, alert_id=payload["alert_id"])
            if alert:
                hub.publish(alert)

    await listen(settings, NOTIFY_CHANNEL, feed, listening=listening)
