"""The delivery process (`python -m services.notifications.delivery`, issue 18): the API/worker
process runs with NOTIFY_DELIVERY_IN_PROCESS=false and only records e-mail/SMS rows; the
delivery process, a separate OS process, sends what the worker recorded, woken by the worker's
commit (LISTEN), not by its poll."""

from __future__ import annotations

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
