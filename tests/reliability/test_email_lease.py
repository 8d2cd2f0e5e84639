"""Two notifications replicas deliver from one database through one slow SMTP server: every
e-mail (and SMS) arrives exactly once.

The SMTP server (the project's sink) answers each DATA after 0.5 s, so one replica needs ~4 s to
send the 8 e-mails it claims, while the delivery lease (NOTIFY_LEASE_S) is 1.5 s. Both replicas
poll every 50 ms. With a fixed lease taken once per batch, the second replica re-leased the
e-mails the first was still queueing and sent them too; with the lease renewed while a delivery
is in flight, it never sends what the other holds. Each mail carries X-CLMS-Notification-Id.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from services.notifications import service
from services.notifications.channels import EmailSender, SmsWebhookSender
from services.notifications.delivery import DeliveryLoop
from services.notifications.sink import Sink
from shared import events as ev
from shared.db import create_pool, migrate
from shared.embedded import free_port
from shared.kafka import make_producer
from shared.topics import Topics
from tests.infra import wait_until

pytestmark = pytest.mark.reliability

SMTP_DELAY_S = 0.5
LEASE_S = 1.5
OFFICES = [("csw", "prizren"), ("education", "prizren"), ("police", "prizren"), ("csw", "peje"),
           ("education", "peje"), ("police", "peje"), ("csw", "gjakove"), ("education", "gjakove")]


def created(agency: str, municipality: str) -> ev.Envelope:
    data = ev.ReferralCreated(
        referral_id=uuid.uuid4(), case_id=uuid.uuid4(), municipality=municipality, agency=agency,
        office_id=f"{agency}.{municipality}", rule_id="csw-every-child", rule_version=1, priority="normal",
        deadline=datetime.now(timezone.utc) + timedelta(hours=24), legal_basis="Law 06/L-084",
        age_band=ev.AgeBand.from_10_to_14, sector=ev.Sector.begging, reported_by="police.prizren.duty")
    return ev.Envelope.wrap(data, source="referral", subject=data.case_id)


async def test_two_replicas_and_a_slow_smtp_server_send_each_email_exactly_once(env):
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), delay_s=SMTP_DELAY_S,
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    settings = env.model_copy(update={
        "smtp_port_override": sink.smtp_port,
        "sms_webhook_url_override": f"http://127.0.0.1:{sink.http_port}/sms",
        "notify_poll_interval_s": 0.05,
        "notify_lease_s": LEASE_S,
    })
    pools = [await create_pool(settings), await create_pool(settings)]
    producer = make_producer(settings)
    await producer.start()
    replicas: list[DeliveryLoop] = []
    senders: list = []
    tasks: list[asyncio.Task] = []
    try:
        async with pools[0].acquire() as conn:
            await migrate(conn, schema=service.SCHEMA, folder=service.MIGRATIONS)
            await service.seed_if_empty(conn)
            for agency, municipality in OFFICES:
                async with conn.transaction():
                    await service.record_event(conn, envelope=created(agency, municipality), settings=settings)
            emails = {str(r["notification_id"]) for r in await conn.fetch(
                f"select notification_id from {service.SCHEMA}.notifications where channel = 'email'")}
            sms = {str(r["notification_id"]) for r in await conn.fetch(
                f"select notification_id from {service.SCHEMA}.notifications where channel = 'sms'")}
        assert len(emails) >= len(OFFICES), "every office's duty officer gets an e-mail"
        assert len(emails) * SMTP_DELAY_S > 2 * LEASE_S, "the test needs a batch that outlasts the lease"

        for pool in pools:
            email, text = EmailSender(settings), SmsWebhookSender(settings)
            senders += [email, text]
            replicas.append(DeliveryLoop(pool=pool, settings=settings, senders={"email": email, "sms": text},
                                                 producer=producer, topics=Topics(settings.topic_prefix),
                                                 lease_s=LEASE_S))
        tasks = [asyncio.create_task(r.run(), name=f"replica-{i}") for i, r in enumerate(replicas)]

        async def all_sent() -> bool:
            return await pools[0].fetchval(
                f"select count(*) = 0 from {service.SCHEMA}.notifications "
                "where channel in ('email', 'sms') and status <> 'sent'")
        await wait_until(all_sent, timeout_s=90, what="every e-mail and SMS to be sent", interval_s=0.1)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in senders:
            with contextlib.suppress(Exception):
                await s.aclose()
        await producer.stop()
        for pool in pools:
            await pool.close()
        await sink.stop()

    got = Counter(m["notification_id"] for m in sink.messages)
    doubled = {nid: n for nid, n in got.items() if n > 1}
    assert not doubled, f"{len(doubled)} of {len(emails)} e-mails sent more than once: {doubled}"
    assert set(got) == emails
    assert Counter(s["notification_id"] for s in sink.sms) == Counter(sms)
    print(f"\n[reliability] {len(emails)} e-mails through a {SMTP_DELAY_S}s SMTP server, lease {LEASE_S}s, "
          f"2 replicas: each delivered once; sends cancelled for a lost lease: "
          f"{[r.lost_leases for r in replicas]}")


async def test_a_replica_whose_lease_was_taken_over_cancels_its_send(env):
    """A replica's claim is taken over while its e-mail is still on the wire (the test plays the
    other replica: it writes its own lease token, as a claim after an expired lease does). At its
    next renewal the first replica finds the lease gone and cuts the SMTP transaction before the
    server's answer; when the row is free again it is sent, and the mail arrives once."""
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), delay_s=3.0,
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    settings = env.model_copy(update={
        "smtp_port_override": sink.smtp_port,
        "sms_webhook_url_override": f"http://127.0.0.1:{sink.http_port}/sms",
        "notify_poll_interval_s": 0.05,
        "notify_lease_s": LEASE_S,
    })
    pool = await create_pool(settings)
    producer = make_producer(settings)
    await producer.start()
    email, text = EmailSender(settings), SmsWebhookSender(settings)
    replica = DeliveryLoop(pool=pool, settings=settings, senders={"email": email, "sms": text},
                                   producer=producer, topics=Topics(settings.topic_prefix))
    task = None
    S = service.SCHEMA
    try:
        async with pool.acquire() as conn:
            await migrate(conn, schema=S, folder=service.MIGRATIONS)
            await service.seed_if_empty(conn)
            async with conn.transaction():
                await service.record_event(conn, envelope=created("csw", "prizren"), settings=settings)
            nid = await conn.fetchval(f"select notification_id from {S}.notifications where channel = 'email'")
            # only the e-mail is due; the SMS waits, so the replica's claim is this one row
            await conn.execute(f"update {S}.notifications set next_attempt_at = now() + interval '1 hour' "
                               "where channel = 'sms'")
        task = asyncio.create_task(replica.run())
        await wait_until(lambda: pool.fetchval(f"select lease_token is not null from {S}.notifications "
                                               "where notification_id = $1", nid),
                         timeout_s=20, what="the replica to claim the e-mail")
        # the other replica takes it over (and holds it for a minute)
        await pool.execute(f"update {S}.notifications set lease_token = $2, next_attempt_at = now() + "
                           "interval '1 minute' where notification_id = $1", nid, uuid.uuid4())
        await wait_until(lambda: replica.lost_leases == 1, timeout_s=10,
                         what="the replica to find its lease taken over and cancel its send")
        assert await pool.fetchval(f"select attempts from {S}.notifications where notification_id = $1", nid) == 0, \
            "a replica that lost the lease records no attempt"
        # the other replica goes away without sending: the row is due again
        await pool.execute(f"update {S}.notifications set next_attempt_at = now() where notification_id = $1", nid)
        await wait_until(lambda: pool.fetchval(f"select status = 'sent' from {S}.notifications "
                                               "where notification_id = $1", nid),
                         timeout_s=30, what="the e-mail to be sent once the row is free")
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for s in (email, text):
            with contextlib.suppress(Exception):
                await s.aclose()
        await producer.stop()
        await pool.close()
        await sink.stop()

    assert [m["notification_id"] for m in sink.messages] == [str(nid)], \
        "the cancelled send delivered nothing; the later one delivered the e-mail once"
