"""The delivery process (`python -m services.notifications.delivery`, issue 18): the API/worker
process runs with NOTIFY_DELIVERY_IN_PROCESS=false and only records e-mail/SMS rows; the
delivery process, a separate OS process, sends what the worker recorded, woken by the worker's
commit (LISTEN), not by its poll."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter

import pytest

from services.notifications.app import create_app
from services.notifications.service import SCHEMA
from shared import events as ev
from tests.apps import bearer, running
from tests.delivery_process import delivery_process
from tests.infra import wait_until
from tests.integration.test_notifications_flow import created, notification_events, publish, sink_and_settings

pytestmark = pytest.mark.integration


async def test_the_delivery_process_sends_what_the_worker_recorded(env):
    async with sink_and_settings(env, notify_delivery_in_process=False) as (sink, settings):
        app = create_app(settings)
        async with running(app) as client:
            assert (await client.get("/readyz")).status_code == 200
            st = app.state.notifications
            assert st.delivery is None and "delivery" not in {t.get_name() for t in st.tasks}, \
                "NOTIFY_DELIVERY_IN_PROCESS=false: the API/worker process runs no delivery loop"

            urgent = created(priority="urgent")  # in-app, e-mail and SMS for the duty officer
            await publish(env, urgent)
            duty = bearer(settings, sub="csw.prizren.duty", agency="csw", municipality="prizren",
                          roles=["duty_officer"])

            async def inbox() -> list:
                return (await client.get("/v1/inbox", headers=duty)).json()["items"]
            await wait_until(inbox, timeout_s=30, what="the worker to record the alert")
            rows = {r["channel"]: r for r in await _notifications(settings, urgent.id)}
            assert rows["email"]["status"] == rows["sms"]["status"] == "pending", \
                "the worker records e-mail and SMS; it does not send them"

            # A 60 s poll: only the worker's NOTIFY on commit can wake it in time for what follows.
            async with delivery_process(settings, sink, NOTIFY_POLL_INTERVAL_S=60):
                later = created(priority="high", municipality="peje")
                await publish(env, later)

                async def delivered() -> bool:
                    return {m["notification_id"] for m in sink.messages} >= {
                        str(r["notification_id"]) for eid in (urgent.id, later.id)
                        for r in await _notifications(settings, eid) if r["channel"] == "email"} \
                        and len(sink.sms) == 2
                await wait_until(delivered, timeout_s=30, what="the delivery process to send both e-mails and SMS")

            sent = await _notifications(settings, urgent.id) + await _notifications(settings, later.id)
            assert {r["status"] for r in sent} == {"sent"}
            assert Counter(m["notification_id"] for m in sink.messages) == Counter(
                str(r["notification_id"]) for r in sent if r["channel"] == "email"), "each e-mail exactly once"
            assert sorted(s["notification_id"] for s in sink.sms) == sorted(
                str(r["notification_id"]) for r in sent if r["channel"] == "sms")
            # its notification.sent events are published by the API/worker process's outbox relay
            events = await notification_events(env, min_count=6)
            assert Counter((e.data.channel, e.type) for e in events
                           if isinstance(e.data, ev.NotificationSent)) == Counter(
                {(ev.Channel.inapp, "notification.sent"): 2, (ev.Channel.email, "notification.sent"): 2,
                 (ev.Channel.sms, "notification.sent"): 2})


async def _notifications(settings, event_id: uuid.UUID) -> list:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetch(f"select * from {SCHEMA}.notifications where event_id = $1", event_id)
    finally:
        await conn.close()


async def _referred_to_csw(conn, settings, municipalities: list[str]) -> None:
    """The notifications schema with its seeded directory, and the notifications of a referral to
    the CSW of each municipality recorded (e-mails pending)."""
    from tests.reliability.test_email_lease import created as created_normal

    await _recorded(conn, settings, [created_normal("csw", m) for m in municipalities])


async def _recorded(conn, settings, envelopes: list[ev.Envelope]) -> None:
    """The notifications schema with its seeded directory, and the notifications `envelopes` cause
    recorded (e-mail and SMS rows pending)."""
    from services.notifications import service
    from shared.db import migrate

    await migrate(conn, schema=SCHEMA, folder=service.MIGRATIONS)
    await service.seed_if_empty(conn)
    async with conn.transaction():
        await service.record_events(conn, items=[(e, None) for e in envelopes], settings=settings)


async def test_sent_notifications_are_recorded_a_batch_in_one_statement(env):
    """`store.record_sent`, the delivery loop's record of what it sent (issue 18: one statement per
    batch instead of a transaction of four per message): each row still pending becomes `sent`
    with its attempt and exactly one `notification.sent` outbox row, in the order given; a row
    another replica recorded meanwhile keeps its state and gets no second event."""
    from services.notifications import store
    from services.notifications.service import notification_envelope
    from shared import outbox
    from shared.db import create_pool
    from shared.topics import Topic

    pool = await create_pool(env)
    try:
        async with pool.acquire() as conn:
            await _referred_to_csw(conn, env, ["prizren", "peje", "gjakove", "ferizaj"])
            rows = await store.claim_due_deliveries(conn, limit=100, lease_s=30, token=uuid.uuid4())
            rows = [r for r in rows if r["channel"] == "email"]
            assert len(rows) == 4
            other = rows[1]["notification_id"]  # recorded as sent by another replica meanwhile
            await conn.execute(f"update {SCHEMA}.notifications set status = 'sent', attempts = 1 "
                               "where notification_id = $1", other)
            before = await conn.fetchval(f"select coalesce(max(seq), 0) from {SCHEMA}.outbox")
            sent = [(r["notification_id"], r["attempts"] + 1) for r in rows]
            envelopes = [notification_envelope(ev.NotificationSent, r, attempt=r["attempts"] + 1) for r in rows]
            marked = await store.record_sent(conn, sent, [outbox.row(Topic.notification_events, e) for e in envelopes])

            assert marked == {r["notification_id"] for r in rows} - {other}
            states = dict(await conn.fetch(f"select notification_id, status from {SCHEMA}.notifications "
                                           "where notification_id = any($1)", [n for n, _ in sent]))
            assert set(states.values()) == {"sent"}
            assert await conn.fetchval(f"select count(*) from {SCHEMA}.notifications where notification_id = any($1) "
                                       "and (attempts <> 1 or sent_at is null)", list(marked)) == 0
            events = await conn.fetch(f"select event_id, event_type, key from {SCHEMA}.outbox where seq > $1 "
                                      "order by seq", before)
            assert [e["event_id"] for e in events] == [e.id for r, e in zip(rows, envelopes)
                                                       if r["notification_id"] != other], "one event each, in order"
            assert {e["event_type"] for e in events} == {"notification.sent"}
            attempts = await conn.fetch(f"select notification_id, attempt, ok from {SCHEMA}.delivery_attempts "
                                        "where notification_id = any($1) and attempt = 1", list(marked))
            assert sorted((a["notification_id"], a["ok"]) for a in attempts) == sorted((n, True) for n in marked)
            assert await store.record_sent(conn, sent, [outbox.row(Topic.notification_events, e) for e in envelopes]) \
                == set(), "recording again marks nothing and publishes nothing"
            assert await conn.fetchval(f"select count(*) from {SCHEMA}.outbox where seq > $1", before) == 3
    finally:
        await pool.close()


async def test_the_sends_of_one_claim_are_recorded_together(env, monkeypatch):
    """The delivery loop records what one claim sent in one statement, not a transaction per
    message (issue 18): the rows share one `sent_at`, PostgreSQL's transaction time. The linger
    is raised so that a slow machine cannot split the batch."""
    from services.notifications import delivery
    from services.notifications.channels import EmailSender, SmsWebhookSender
    from services.notifications.sink import Sink
    from shared.db import create_pool
    from shared.embedded import free_port
    from shared.kafka import make_producer
    from shared.topics import Topics

    monkeypatch.setattr(delivery, "RECORD_LINGER_S", 30.0)
    sink = await Sink(smtp_port=free_port(), http_port=free_port(),
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    settings = env.model_copy(update={"smtp_port_override": sink.smtp_port,
                                      "sms_webhook_url_override": f"http://127.0.0.1:{sink.http_port}/sms"})
    pool = await create_pool(settings)
    producer = make_producer(settings)
    await producer.start()
    senders = {"email": EmailSender(settings), "sms": SmsWebhookSender(settings)}
    try:
        async with pool.acquire() as conn:
            await _referred_to_csw(conn, settings, ["prizren", "peje", "gjakove", "ferizaj", "gjilan"])
        loop = delivery.DeliveryLoop(pool=pool, settings=settings, senders=senders, producer=producer,
                                     topics=Topics(settings.topic_prefix))
        assert await loop.run_once() >= 5
        rows = await pool.fetch(f"select status, sent_at from {SCHEMA}.notifications where channel = 'email'")
        assert len(rows) == 5 and {r["status"] for r in rows} == {"sent"}
        assert len(sink.messages) == 5
        assert len({r["sent_at"] for r in rows}) == 1, "recorded in one statement"
    finally:
        for s in senders.values():
            with contextlib.suppress(Exception):
                await s.aclose()
        await producer.stop()
        await pool.close()
        await sink.stop()


async def test_a_loop_stopped_mid_claim_records_what_it_had_sent(env, monkeypatch):
    """Stopped while its record waits for the claim's other sends (a deploy's SIGTERM while one
    SMS hangs), the delivery loop records the e-mails already sent before it stops, so they are
    not sent a second time after their lease. The channels here are stand-ins: e-mail accepted at
    once, an SMS gateway that never answers."""
    from services.notifications import delivery
    from shared.db import create_pool
    from shared.kafka import make_producer
    from shared.topics import Topics

    class Accepting:
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def send(self, message) -> None:  # noqa: ANN001
            self.sent.append(message.notification_id)

    class Hanging:
        async def send(self, message) -> None:  # noqa: ANN001
            await asyncio.Event().wait()

    monkeypatch.setattr(delivery, "RECORD_LINGER_S", 60.0)  # the record would wait for the SMS
    pool = await create_pool(env)
    producer = make_producer(env)
    await producer.start()
    email = Accepting()
    try:
        async with pool.acquire() as conn:
            await _recorded(conn, env, [created(municipality=m, priority="urgent") for m in ("prizren", "peje", "gjakove")])
        loop = delivery.DeliveryLoop(pool=pool, settings=env, senders={"email": email, "sms": Hanging()},
                                     producer=producer, topics=Topics(env.topic_prefix))
        running = asyncio.create_task(loop.run_once())
        await wait_until(lambda: len(email.sent) == 3, timeout_s=30, what="the three e-mails to be sent")
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        states = dict(await pool.fetch(f"select channel || ':' || notification_id::text, status "
                                       f"from {SCHEMA}.notifications where channel in ('email', 'sms')"))
        assert sorted(k for k, v in states.items() if v == "sent") == sorted(f"email:{n}" for n in email.sent)
        assert [v for k, v in states.items() if k.startswith("sms:")] == ["pending"] * 3
    finally:
        await producer.stop()
        await pool.close()

