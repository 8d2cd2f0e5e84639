"""Issue 15, item 6: an officer's e-mail address quoted by an SMTP server's error never reaches
`notification.failed`, the dead letter or the delivery rows (real broker, real PostgreSQL, a
real SMTP server that refuses the recipient and echoes the address, as Postfix does)."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from services.notifications.app import create_app
from services.notifications.service import SCHEMA
from shared import events as ev
from shared.embedded import free_port
from shared.kafka import DeadLetter
from shared.topics import Topics
from tests.apps import running
from tests.infra import wait_until
from tests.integration.test_notifications_flow import created, notification_events, publish
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration


class RefusesRecipients:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802, ANN001
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"


async def test_smtp_error_quoting_the_officers_address_is_redacted_everywhere_it_goes(env):
    loop = asyncio.get_running_loop()
    port = free_port()
    server = await loop.create_server(lambda: SMTP(RefusesRecipients(), hostname="mx", loop=loop),
                                      "127.0.0.1", port)
    settings = env.model_copy(update={"smtp_port_override": port, "notify_poll_interval_s": 0.1,
                                      "sms_webhook_url_override": f"http://127.0.0.1:{free_port()}/sms"})
    address = "education.gjilan.duty@example.invalid"  # the seeded officer's address
    try:
        app = create_app(settings)
        async with running(app):
            pool = app.state.notifications.pool
            cause = created(agency="education", municipality="gjilan")
            await publish(settings, cause)
            await wait_until(
                lambda: pool.fetchval(f"select dead_lettered_at is not null from {SCHEMA}.notifications "
                                      "where case_id = $1 and channel = 'email'", cause.data.case_id),
                timeout_s=30, what="the refused e-mail to fail and be dead-lettered")
            stored = [r["error"] for r in await pool.fetch(
                f"select a.error from {SCHEMA}.delivery_attempts a join {SCHEMA}.notifications n "
                "using (notification_id) where n.case_id = $1 and not a.ok", cause.data.case_id)]
            last = await pool.fetchval(f"select last_error from {SCHEMA}.notifications where case_id = $1 "
                                       "and channel = 'email'", cause.data.case_id)
    finally:
        server.close()
        await server.wait_closed()

    failed = [e for e in await notification_events(settings, min_count=2) if e.type == "notification.failed"]
    assert len(failed) == 1 and failed[0].data.channel is ev.Channel.email
    error = failed[0].data.error
    # the server's answer is kept (the operator needs it), the address is not
    assert "Recipient address rejected" in error and "<e-mail>" in error, error
    assert address not in error and "@" not in error
    topics = Topics(settings.topic_prefix)
    letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value)
               for r in await read_all(settings, topics.dead_letters, min_count=1)]
    assert [dl.reason for dl in letters] == ["delivery_failed"]
    assert "Recipient address rejected" in letters[0].error and "@" not in letters[0].error
    assert stored and all("@" not in e for e in stored) and "@" not in last
