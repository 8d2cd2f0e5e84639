"""The delivery process killed in the middle of an e-mail (SIGKILL: a crash; SIGTERM: a
rolling deploy), then a new one started: every e-mail arrives exactly once.

12 e-mails wait in the database; the SMTP server (the project's sink) answers each mail 0.5 s
after its data, so a send is on the wire most of the time. The process is stopped while the
server holds an unanswered mail and after every mail it answered is recorded as sent (the
moment the test checks, on the event loop the sink runs on, so the server cannot answer in
between). The cut connection makes the server drop that mail, as SMTP requires; the rows the
dead process had claimed are free again after its lease (NOTIFY_LEASE_S = 2 s), and the new
process sends them."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from services.notifications import service
from services.notifications.sink import Sink
from shared.db import create_pool, migrate
from shared.embedded import free_port
from tests.delivery_process import DeliveryProcess
from tests.infra import wait_until
from tests.reliability.test_email_lease import created

pytestmark = pytest.mark.reliability

OFFICES = [(agency, municipality) for agency in ("csw", "education", "police")
           for municipality in ("prizren", "peje", "gjakove", "ferizaj")]
S = service.SCHEMA
# A 2 s lease; the safety-net sleep (NOTIFY_POLL_INTERVAL_S) far beyond the test's timeout: the new
# process must wake when the dead one's lease ends, not at a poll (issue 18).
PROCESS_ENV = {"NOTIFY_LEASE_S": 2, "NOTIFY_POLL_INTERVAL_S": 600}


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_delivery_process_stopped_mid_send_loses_and_doubles_nothing(env, how):
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), delay_s=0.5,
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    pool = await create_pool(env)
    procs: list[DeliveryProcess] = []
    try:
        async with pool.acquire() as conn:
            await migrate(conn, schema=S, folder=service.MIGRATIONS)
            await service.seed_if_empty(conn)
            async with conn.transaction():
                await service.record_events(conn, items=[(created(a, m), None) for a, m in OFFICES],
                                            settings=env)
        emails = {str(r["notification_id"]) for r in await pool.fetch(
            f"select notification_id from {S}.notifications where channel = 'email'")}
        assert len(emails) == len(OFFICES) and not await pool.fetchval(
            f"select count(*) from {S}.notifications where channel = 'sms'"), "12 e-mails, no SMS"

        first = DeliveryProcess(env, sink, **PROCESS_ENV).start()
        procs.append(first)

        seen: dict = {}

        async def mid_send() -> bool:
            recorded = await pool.fetchval(f"select count(*) from {S}.notifications where channel = 'email' "
                                           "and status = 'sent'")
            seen.update(recorded=recorded, accepted=len(sink.messages), receiving=sink.receiving)
            # no await from here to the signal: the sink cannot answer the mail it holds
            if recorded >= 3 and recorded == len(sink.messages) and sink.receiving:
                first.stop(getattr(signal, how))
                return True
            return False
        try:
            await wait_until(mid_send, timeout_s=60, what="the first process to be in the middle of a send",
                             interval_s=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {seen}; its log:\n{first.tail()}") from None
        stopped_after = len(sink.messages)
        assert stopped_after < len(emails)

        procs.append(DeliveryProcess(env, sink, **PROCESS_ENV).start())
        await wait_until(lambda: pool.fetchval(f"select count(*) = 0 from {S}.notifications "
                                               "where channel = 'email' and status <> 'sent'"),
                         timeout_s=90, what="the second process to send the rest", interval_s=0.2)
        got = Counter(m["notification_id"] for m in sink.messages)
        assert set(got) == emails, "nothing lost"
        assert not {nid: n for nid, n in got.items() if n > 1}, "nothing sent twice"
        assert await pool.fetchval(
            f"select count(*) from {S}.delivery_attempts a join {S}.notifications n using (notification_id) "
            "where n.channel = 'email' and a.ok") == len(emails), "one successful attempt recorded per e-mail"
        print(f"\n[reliability] delivery process stopped with {how} after {stopped_after} of {len(emails)} "
              f"e-mails, mid-send; a new process sent the rest: each e-mail once")
    finally:
        for p in procs:
            p.stop()
            p.log.unlink(missing_ok=True)
        await pool.close()
        await sink.stop()
