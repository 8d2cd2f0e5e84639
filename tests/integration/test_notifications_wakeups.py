"""Issue 18, idle: the delivery and re-alert loops do not poll. They sleep until what they wait
for falls due (a retry after its backoff, the end of a lease, a re-alert), woken earlier by the
commit that records something new; NOTIFY_POLL_INTERVAL_S is only a safety net, set here far
beyond every wait of the test, so only the due time can wake them in time."""

from __future__ import annotations

import pytest

from services.notifications import rules, service
from services.notifications.app import create_app
from services.notifications.sink import Sink
from shared.db import create_pool, migrate
from shared.embedded import free_port
from tests.apps import running
from tests.delivery_process import DeliveryProcess
from tests.infra import wait_until
from tests.integration.test_notifications_flow import created, publish, sink_and_settings

pytestmark = pytest.mark.integration

S = service.SCHEMA
SAFETY_NET_S = 600  # NOTIFY_POLL_INTERVAL_S: no wait below may rely on it
ON_TIME_S = 1.0  # how late a wake may be on this (shared, loaded) machine


async def test_the_delivery_process_retries_a_failed_email_when_its_backoff_ends(env):
    sink = await Sink(smtp_port=free_port(), http_port=free_port(),
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    await sink.stop_smtp()  # the first attempt fails: connection refused
    pool = await create_pool(env)
    proc = None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, schema=S, folder=service.MIGRATIONS)
            await service.seed_if_empty(conn)
            async with conn.transaction():
                await service.record_event(conn, envelope=created(agency="police", municipality="ferizaj"),
                                           settings=env)
        # attempt 1 fails at once; the retry falls due 1.5-3 s later (equal jitter over 3 s)
        proc = DeliveryProcess(env, sink, NOTIFY_POLL_INTERVAL_S=SAFETY_NET_S, NOTIFY_BACKOFF_BASE_S=3,
                               NOTIFY_BACKOFF_MAX_S=3).start()
        failed = await wait_until(
            lambda: pool.fetchrow(f"select next_attempt_at as due, last_error from {S}.notifications "
                                  "where channel = 'email' and status = 'pending' and attempts = 1"),
            timeout_s=60, what="the first (failed) attempt to be recorded with its retry time")
        await sink.start_smtp()
        sent = await wait_until(
            lambda: pool.fetchrow(f"select sent_at, attempts from {S}.notifications "
                                  "where channel = 'email' and status = 'sent'"),
            timeout_s=30, what=f"the retry (due {failed['due']}; the safety net is {SAFETY_NET_S} s)")
        late = (sent["sent_at"] - failed["due"]).total_seconds()
        assert sent["attempts"] == 2
        assert 0 <= late < ON_TIME_S, f"the retry went out {late:.2f} s after its due time"
        assert len(sink.messages) == 1
    finally:
        if proc is not None:
            proc.stop()
            proc.log.unlink(missing_ok=True)
        await pool.close()
        await sink.stop()


async def test_an_unhandled_referral_is_realerted_when_realert_after_s_has_passed(env):
    after_s = 3.0
    async with sink_and_settings(env, realert_after_s=after_s, notify_poll_interval_s=SAFETY_NET_S) as (_, settings):
        app = create_app(settings)
        async with running(app):
            pool = app.state.notifications.pool
            event = created(municipality="gjakove")
            await publish(settings, event)  # the re-alert loop is asleep (nothing was due) until this
            ref = await wait_until(
                lambda: pool.fetchrow(f"select alerted_at, realerted_at from {S}.referrals "
                                      "where referral_id = $1 and realerted_at is not null",
                                      event.data.referral_id),
                timeout_s=30, what=f"the re-alert ({after_s} s after the alert; safety net {SAFETY_NET_S} s)")
            late = (ref["realerted_at"] - ref["alerted_at"]).total_seconds() - after_s
            assert 0 <= late < ON_TIME_S, f"the re-alert came {late:.2f} s after REALERT_AFTER_S"
            assert await pool.fetchval(
                f"select count(*) from {S}.alerts where referral_id = $1 and event_type = $2 "
                "and recipient = 'csw.gjakove.supervisor'", event.data.referral_id, rules.REALERT) == 1


async def test_after_work_the_loops_sleep_until_the_next_due_time(env):
    """Once a referral's e-mail is sent, nothing is due: the delivery loop sleeps for the safety
    net, the re-alert loop until the referral's re-alert falls due. Neither wakes itself (a round
    that rang its own doorbell would spin, and never be seen asleep)."""
    after_s = 300.0
    async with sink_and_settings(env, realert_after_s=after_s, notify_poll_interval_s=SAFETY_NET_S) as (sink, settings):
        app = create_app(settings)
        async with running(app):
            deps = app.state.notifications.deps
            await publish(settings, created(municipality="peje"))
            await wait_until(lambda: sink.messages, timeout_s=30, what="the e-mail")
            await wait_until(lambda: deps.delivery.alarm.asleep_s > SAFETY_NET_S - 60, timeout_s=10,
                             what="the delivery loop asleep for the safety net")
            await wait_until(lambda: after_s - 60 < deps.realerts.alarm.asleep_s <= after_s, timeout_s=10,
                             what=f"the re-alert loop asleep until the re-alert falls due (~{after_s:.0f} s)")
