"""Notifications against the real broker, the real Postgres and a real SMTP server (the sink,
aiosmtpd, in this process): referral events in -> e-mail, SMS webhook, inbox + SSE, events out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import httpx
import orjson
import pytest
from pydantic import SecretStr

from services.notifications import rules, store
from services.notifications.app import create_app
from services.notifications.channels import OutgoingMessage, SmsWebhookSender
from services.notifications.directory import seed_officers
from services.notifications.service import MIGRATIONS, SCHEMA, seed_if_empty
from services.notifications.sink import Sink
from services.notifications.signing import sign
from shared import events as ev
from shared.db import migrate
from shared.embedded import free_port
from shared.kafka import DeadLetter
from shared.topics import Topics
from tests.apps import bearer, running, served as http_server
from tests.infra import wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


def created(*, municipality="prizren", agency="csw", priority="normal", reported_by="police.prizren.duty",
            **kw) -> ev.Envelope:
    data = ev.ReferralCreated(
        referral_id=uuid.uuid4(), case_id=uuid.uuid4(), municipality=municipality, agency=agency,
        office_id=f"{agency}.{municipality}", rule_id="csw-every-child", rule_version=1, priority=priority,
        deadline=datetime.now(timezone.utc) + timedelta(hours=24), legal_basis="Law 06/L-084",
        age_band=ev.AgeBand.from_10_to_14, sector=ev.Sector.begging, reported_by=reported_by, **kw)
    return ev.Envelope.wrap(data, source="referral", subject=data.case_id)


def acted(cause: ev.Envelope, model=ev.ReferralAccepted, **extra) -> ev.Envelope:
    d = cause.data
    data = model(referral_id=d.referral_id, case_id=d.case_id, municipality=d.municipality, agency=d.agency,
                 office_id=d.office_id, actor=f"{d.office_id}.duty", from_status=ev.ReferralStatus.acknowledged,
                 to_status=ev.ReferralStatus.accepted, **extra)
    return cause.follow(data, source=f"{d.agency.value}/{d.municipality}")


async def publish(env, *envelopes: ev.Envelope) -> None:
    topics = Topics(env.topic_prefix)
    await produce(env, topics.referral_events, [(e.key, e.to_json_bytes()) for e in envelopes])


def mails_to(sink: Sink, address: str) -> list[dict]:
    return [m for m in sink.messages if address in m["rcpt_tos"]]


@contextlib.asynccontextmanager
async def sink_and_settings(env, **extra):
    sink = await Sink(smtp_port=free_port(), http_port=free_port(),
                      webhook_secret=env.webhook_secret.get_secret_value()).start()
    settings = env.model_copy(update={
        "smtp_port_override": sink.smtp_port,
        "sms_webhook_url_override": f"http://127.0.0.1:{sink.http_port}/sms",
        "workspace_url_override": "https://clms.example.org",
        # a safety net far beyond every wait below: retries and re-alerts must wake the loops
        # when they fall due, and new rows by the commit that recorded them (issue 18)
        "notify_poll_interval_s": 600,
        **extra,
    })
    try:
        yield sink, settings
    finally:
        await sink.stop()


async def notification_events(env, min_count: int) -> list[ev.Envelope]:
    topics = Topics(env.topic_prefix)
    records = await read_all(env, topics.notification_events, min_count=min_count, timeout_s=20, idle_s=0.3)
    return [ev.parse_envelope(r.value) for r in records]


@contextlib.asynccontextmanager
async def notifications_app(env, **extra):
    """The notifications API/worker (delivery in process) on the test's broker and database,
    sending to a sink: yields (sink, settings, app, in-process client)."""
    async with sink_and_settings(env, **extra) as (sink, settings):
        app = create_app(settings)
        async with running(app) as client:
            yield sink, settings, app, client


def officer(settings, sub: str, role: str = "duty_officer") -> dict[str, str]:
    """The bearer header of an office's officer, e.g. `csw.prizren.duty`."""
    agency, municipality = sub.split(".")[:2]
    return bearer(settings, sub=sub, agency=agency, municipality=municipality, roles=[role])


async def _items(client, headers):
    return (await client.get("/v1/inbox", headers=headers)).json()["items"]


async def test_a_new_alert_is_pushed_to_the_officers_stream_within_a_second(env):
    async with notifications_app(env) as (_, settings, app, client), http_server(app) as base:
        duty = officer(settings, "csw.prizren.duty")
        got: dict = {}
        ready = asyncio.Event()

        async def listen() -> None:
            async with httpx.AsyncClient(timeout=30) as http, \
                    http.stream("GET", f"{base}/v1/inbox/stream", headers=duty) as resp:
                assert resp.status_code == 200
                event = None
                async for line in resp.aiter_lines():
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                        if event == "ready":
                            ready.set()
                    elif line.startswith("data:") and event == "alert":
                        got.update(t=time.monotonic(), alert=orjson.loads(line.split(":", 1)[1]))
                        return

        listener = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 10)
        # the first event also pays for the consumer's first fetch: measure the second
        await publish(settings, created(municipality="peje"))
        await wait_until(lambda: _items(client, officer(settings, "csw.peje.duty")), timeout_s=30,
                         what="the warm-up alert")
        first = created(priority="urgent")
        t0 = time.monotonic()
        await publish(settings, first)
        await asyncio.wait_for(listener, 10)
        assert got["t"] - t0 < 1.0, f"SSE alert took {got['t'] - t0:.2f}s"
        assert got["alert"]["case_id"] == str(first.data.case_id)
        assert got["alert"]["event_type"] == "referral.created"


async def test_email_in_the_officers_language_and_sms_for_an_urgent_referral(env):
    async with notifications_app(env) as (sink, settings, _, _client):
        first, serb = created(priority="urgent"), created(municipality="zvecan")
        await publish(settings, first, serb)
        await wait_until(lambda: mails_to(sink, "csw.prizren.duty@example.invalid"), timeout_s=30,
                         what="the e-mail to the on-duty officer")
        mail = mails_to(sink, "csw.prizren.duty@example.invalid")[0]
        assert mail["language"] == "sq" and "Referim i ri" in mail["subject"]
        assert str(first.data.case_id) in mail["body"]
        phone = next(o.phone for o in seed_officers() if o.officer_id == "csw.prizren.duty")
        sms = await wait_until(lambda: [s for s in sink.sms if s["to"] == phone], timeout_s=10,
                               what="the signed SMS webhook (urgent referral)")
        assert "URGJENT" in sms[0]["text"]
        assert f"https://clms.example.org/referrals/{first.data.referral_id}" in sms[0]["text"]
        await wait_until(lambda: mails_to(sink, "csw.zvecan.duty@example.invalid"), timeout_s=10,
                         what="the e-mail to Zvečan")
        assert mails_to(sink, "csw.zvecan.duty@example.invalid")[0]["language"] == "sr"
        assert "Novi uput" in mails_to(sink, "csw.zvecan.duty@example.invalid")[0]["subject"]
        # the supervisor is not on duty: a new referral is for the duty officer only
        assert {r for m in sink.messages for r in m["rcpt_tos"]} == {
            "csw.prizren.duty@example.invalid", "csw.zvecan.duty@example.invalid"}


async def test_only_the_recipient_can_acknowledge_an_alert(env):
    async with notifications_app(env) as (_, settings, _app, client):
        first, elsewhere = created(), created(municipality="peje")
        await publish(settings, first, elsewhere)
        duty, other = officer(settings, "csw.prizren.duty"), officer(settings, "csw.peje.duty")
        items = await wait_until(lambda: _items(client, duty), timeout_s=30, what="the alert in the inbox")
        assert [i["case_id"] for i in items] == [str(first.data.case_id)]
        alert_id = items[0]["id"]
        others = await wait_until(lambda: _items(client, other), timeout_s=10, what="the other office's alert")
        assert [i["case_id"] for i in others] == [str(elsewhere.data.case_id)]
        assert (await client.post(f"/v1/inbox/{alert_id}/ack", headers=other)).status_code == 404
        assert (await client.post(f"/v1/inbox/{alert_id}/ack")).status_code == 401
        assert (await client.post("/v1/inbox/not-a-uuid/ack", headers=duty)).status_code == 422
        r = await client.post(f"/v1/inbox/{alert_id}/ack", headers=duty)
        assert r.status_code == 200 and r.json()["acked_at"]
        assert (await client.get("/v1/inbox", headers=duty)).json()["unacked"] == 0
        out = await notification_events(settings, min_count=5)  # 2 in-app and 2 e-mails sent, 1 ack
    acks = [e for e in out if e.type == "notification.acknowledged"]
    assert len(acks) == 1 and acks[0].data.notification_id == rules.notification_id(
        first.id, "csw.prizren.duty", "inapp")
    assert acks[0].data.seconds_to_ack >= 0 and acks[0].correlationid == first.correlationid


async def test_a_redelivered_event_notifies_nobody_again(env):
    async with notifications_app(env) as (sink, settings, _app, client):
        first = created()
        await publish(settings, first)
        await wait_until(lambda: mails_to(sink, "csw.prizren.duty@example.invalid"), timeout_s=30,
                         what="the first e-mail")
        before = len(sink.messages)
        await publish(settings, first, acted(first))  # a later event proves the redelivered one was consumed
        await wait_until(lambda: mails_to(sink, "police.prizren.duty@example.invalid"), timeout_s=10,
                         what="the reporter's e-mail about the acceptance")
        assert len(sink.messages) == before + 1
        assert len(mails_to(sink, "csw.prizren.duty@example.invalid")) == 1
        assert len(await _items(client, officer(settings, "csw.prizren.duty"))) == 1
        reporter = officer(settings, "police.prizren.duty", role="reporter")
        assert [i["event_type"] for i in await _items(client, reporter)] == ["referral.accepted"]


async def test_an_unacknowledged_referral_is_realerted_to_its_supervisor_once(env):
    after_s = 5.0  # long enough to acknowledge the other referral before its re-alert falls due
    async with notifications_app(env, realert_after_s=after_s) as (sink, settings, app, client):
        pool = app.state.notifications.pool
        acked, ignored = created(), created(municipality="zvecan")
        await publish(settings, acked, ignored)
        alert = (await wait_until(lambda: _items(client, officer(settings, "csw.prizren.duty")), timeout_s=30,
                                  what="the alert to acknowledge"))[0]
        assert (await client.post(f"/v1/inbox/{alert['id']}/ack",
                                  headers=officer(settings, "csw.prizren.duty"))).status_code == 200
        sup = officer(settings, "csw.zvecan.supervisor", role="supervisor")
        realerts = await wait_until(lambda: _items(client, sup), timeout_s=30,
                                    what="the re-alert to the Zvečan supervisor")
        assert [(i["event_type"], i["case_id"]) for i in realerts] == [(rules.REALERT, str(ignored.data.case_id))]
        await wait_until(lambda: mails_to(sink, "csw.zvecan.supervisor@example.invalid"), timeout_s=10,
                         what="the re-alert e-mail")
        # once: the re-alerted referral is marked so, the acknowledged one handled (a re-alert
        # round takes neither), and no other re-alert is due at all
        marks = {r["referral_id"]: (r["handled_at"] is not None, r["realerted_at"] is not None)
                 for r in await pool.fetch(f"select * from {SCHEMA}.referrals")}
        assert marks == {acked.data.referral_id: (True, False), ignored.data.referral_id: (False, True)}
        async with pool.acquire() as conn:
            assert await store.seconds_until_next_realert(conn, after_s=after_s) is None
        assert await _items(client, officer(settings, "csw.prizren.supervisor", role="supervisor")) == []


async def test_notification_events_name_no_officer_and_no_contact(env):
    async with notifications_app(env) as (_, settings, _app, _client):
        first = created(priority="urgent")
        await publish(settings, first)
        out = await notification_events(settings, min_count=3)
    sent = [e for e in out if e.type == "notification.sent"]
    # the officer is not on the topic; the deterministic notification id still says who it was
    assert {e.data.notification_id for e in sent} == {
        rules.notification_id(first.id, "csw.prizren.duty", ch) for ch in ("inapp", "email", "sms")}
    assert all(e.data.recipient is None for e in out)
    assert all(e.subject == str(e.data.case_id) for e in out)
    assert b"example.invalid" not in b"".join(e.to_json_bytes() for e in out)  # no contact data


async def test_smtp_outage_retries_then_delivers_or_fails_and_dead_letters(env):
    async with sink_and_settings(env, notify_backoff_base_s=0.3, notify_max_attempts=4,
                                 notify_backoff_max_s=2.0) as (sink, settings):
        await sink.stop_smtp()
        app = create_app(settings)
        async with running(app) as client:
            pool = app.state.notifications.pool

            async def attempts(case_id) -> int:
                return await pool.fetchval(
                    f"select coalesce(max(attempts), 0) from {SCHEMA}.notifications "
                    "where case_id = $1 and channel = 'email'", case_id)

            # outage, then the server comes back: delivered on a later attempt
            a = created(agency="police", municipality="ferizaj")
            await publish(settings, a)
            await wait_until(lambda: attempts(a.data.case_id), timeout_s=30, what="a first failed attempt")
            await sink.start_smtp()
            await wait_until(lambda: mails_to(sink, "police.ferizaj.duty@example.invalid"), timeout_s=10,
                             what="the e-mail after SMTP came back")

            # outage that outlasts every attempt: notification.failed + dead letter; in-app still works
            await sink.stop_smtp()
            b = created(agency="education", municipality="gjilan")
            await publish(settings, b)
            duty = bearer(settings, sub="education.gjilan.duty", agency="education", municipality="gjilan",
                          roles=["duty_officer"])
            inbox = await wait_until(lambda: _items(client, duty), timeout_s=30, what="the in-app alert")
            assert inbox[0]["case_id"] == str(b.data.case_id)
            await wait_until(
                lambda: pool.fetchval(f"select status = 'failed' and dead_lettered_at is not null from "
                                      f"{SCHEMA}.notifications where case_id = $1 and channel = 'email'",
                                      b.data.case_id),
                timeout_s=20, what="the e-mail to be given up and dead-lettered")
            assert await attempts(b.data.case_id) == 4
            # a later alert still flows once the server is back
            await sink.start_smtp()
            c = created(agency="csw", municipality="gjilan")
            await publish(settings, c)
            await wait_until(lambda: mails_to(sink, "csw.gjilan.duty@example.invalid"), timeout_s=15,
                             what="a later e-mail")
            assert not mails_to(sink, "education.gjilan.duty@example.invalid")

        out = await notification_events(settings, min_count=4)
        sent_a = [e for e in out if e.type == "notification.sent" and e.data.case_id == a.data.case_id
                  and e.data.channel is ev.Channel.email]
        assert len(sent_a) == 1 and sent_a[0].data.attempt >= 2
        failed = [e for e in out if e.type == "notification.failed"]
        assert len(failed) == 1 and failed[0].data.case_id == b.data.case_id and failed[0].data.attempts == 4
        assert "SMTP" in failed[0].data.error or "Connect" in failed[0].data.error
        topics = Topics(settings.topic_prefix)
        letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value)
                   for r in await read_all(settings, topics.dead_letters, min_count=1)]
        assert [dl.reason for dl in letters] == ["delivery_failed"]
        assert letters[0].topic == topics.referral_events
        assert ev.parse_envelope(letters[0].value).id == b.id
        assert "education.gjilan.duty" in letters[0].error and "example.invalid" not in letters[0].error


async def test_sink_rejects_a_replayed_signed_webhook_and_a_stale_one(env):
    """issue 16 item 9: a captured, validly signed SMS webhook sent again is refused (its id is
    inside the signature and remembered for the window); so is one signed outside the window."""
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), webhook_secret="s3cret").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sink.http_port}") as http:
            body = b'{"to":"+38300000001","text":"[CLMS] once"}'
            headers = sign(body, "s3cret")
            assert (await http.post("/sms", content=body, headers=headers)).status_code == 202
            again = await http.post("/sms", content=body, headers=headers)
            assert again.status_code == 409 and "already received" in again.json()["detail"]
            other_id = {**headers, "X-CLMS-Webhook-Id": "a-new-id-the-attacker-picks"}
            assert (await http.post("/sms", content=body, headers=other_id)).status_code == 401
            stale = sign(body, "s3cret", timestamp=int(time.time()) - 3600)
            refused = await http.post("/sms", content=body, headers=stale)
            assert refused.status_code == 401 and "timestamp" in refused.json()["detail"]
            assert [s["text"] for s in (await http.get("/sms")).json()] == ["[CLMS] once"]
    finally:
        await sink.stop()


async def test_sms_to_the_sink_go_over_one_kept_alive_connection(env):
    """The delivery process's SMS sender keeps its HTTP connection between messages, and the
    development sink (standing in for an SMS gateway) keeps it open: three SMS, one TCP
    connection (issue 18: a connect and teardown per SMS was CPU on the alert path)."""
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), webhook_secret="s3cret").start()
    settings = env.model_copy(update={"sms_webhook_url_override": f"http://127.0.0.1:{sink.http_port}/sms",
                                      "webhook_secret": SecretStr("s3cret")})
    sender = SmsWebhookSender(settings)
    try:
        for i in range(3):
            await sender.send(OutgoingMessage(notification_id=f"n{i}", recipient="csw.prizren.duty", channel="sms",
                                              address="+38300000001", language="sq", subject=f"[CLMS] {i}",
                                              body="", link=None))
        assert [s["text"] for s in sink.sms] == ["[CLMS] 0", "[CLMS] 1", "[CLMS] 2"]
        assert sink.http_connections == 1
    finally:
        await sender.aclose()
        await sink.stop()


async def test_sms_gateway_answers_map_to_retry_or_give_up(env):
    """What the SMS sender makes of the gateway's answer: unreachable or 5xx/429 -> retry later
    (DeliveryError); a refusal (4xx: here a wrong signature) -> give up (PermanentDeliveryError);
    no phone number -> give up without a request."""
    from services.notifications.channels import DeliveryError, PermanentDeliveryError

    async def answer(status: str):
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()
        return await asyncio.start_server(serve, "127.0.0.1", 0)

    message = OutgoingMessage(notification_id="n1", recipient="csw.prizren.duty", channel="sms", address="+38300000001",
                              language="sq", subject="[CLMS] x", body="", link=None)
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), webhook_secret="s3cret").start()
    busy, closed_port = await answer("503 Service Unavailable"), free_port()
    cases = [(f"http://127.0.0.1:{closed_port}/sms", "s3cret", DeliveryError),
             (f"http://127.0.0.1:{busy.sockets[0].getsockname()[1]}/sms", "s3cret", DeliveryError),
             (f"http://127.0.0.1:{sink.http_port}/sms", "not-the-secret", PermanentDeliveryError)]
    try:
        for url, secret, expected in cases:
            sender = SmsWebhookSender(env.model_copy(update={"sms_webhook_url_override": url,
                                                             "webhook_secret": SecretStr(secret)}))
            try:
                with pytest.raises(DeliveryError) as raised:
                    await sender.send(message)
                assert type(raised.value) is expected, (url, raised.value)
                with pytest.raises(PermanentDeliveryError, match="no phone number"):
                    await sender.send(dataclasses.replace(message, address=None))
            finally:
                await sender.aclose()
        assert not sink.sms and sink.rejected_sms == 1
    finally:
        busy.close()
        await sink.stop()


async def test_sink_accepts_signed_sms_and_rejects_tampered(env):
    sink = await Sink(smtp_port=free_port(), http_port=free_port(), webhook_secret="s3cret").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sink.http_port}") as http:
            body = b'{"to":"+38300000001","text":"[CLMS] test"}'
            ok = await http.post("/sms", content=body, headers=sign(body, "s3cret"))
            assert ok.status_code == 202
            bad = await http.post("/sms", content=body.replace(b"test", b"tEst"), headers=sign(body, "s3cret"))
            assert bad.status_code == 401
            wrong = await http.post("/sms", content=body, headers=sign(body, "not-the-secret"))
            assert wrong.status_code == 401
            listed = (await http.get("/sms")).json()
            assert [s["text"] for s in listed] == ["[CLMS] test"]
            assert (await http.get("/messages")).json() == []
            assert "CLMS mail sink" in (await http.get("/")).text
    finally:
        await sink.stop()


async def test_seed_on_empty_directory_and_cli_roster_import(env, tmp_path):
    conn = await asyncpg.connect(env.database_url)
    try:
        await migrate(conn, schema=SCHEMA, folder=MIGRATIONS)
        n = await seed_if_empty(conn)
        assert n == await conn.fetchval(f"select count(*) from {SCHEMA}.officers") > 400
        assert await seed_if_empty(conn) == 0
        roster = tmp_path / "roster.csv"
        roster.write_text(
            "officer_id,agency,municipality,office_id,role,language,email,phone,inapp,on_duty\n"
            "csw.prizren.duty,csw,prizren,csw.prizren,duty_officer,en,duty@example.org,,true,false\n"
            "csw.prizren.night,csw,prizren,csw.prizren,duty_officer,sq,night@example.org,+38344111222,true,true\n",
            encoding="utf-8")
        bad = tmp_path / "bad.csv"
        bad.write_text("officer_id,agency,municipality,office_id,role,language\n"
                       "x.y.z,csw,prizren,csw.prizren,duty_officer,fr\n", encoding="utf-8")
        cli = [sys.executable, "-c", "from services.notifications.cli import officers_app; officers_app()"]
        envvars = {**os.environ, "DATABASE_URL": env.database_url}

        async def run(*args):
            p = await asyncio.create_subprocess_exec(*cli, *args, env=envvars, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)
            out, err = await p.communicate()
            return p.returncode, out.decode(), err.decode()

        (rc_bad, _, err_bad), (rc, out, err) = await asyncio.gather(run("import", str(bad)), run("import", str(roster)))
        assert rc_bad == 2 and "row 2, column language: 'fr' is not one of sq, sr, en" in err_bad
        assert rc == 0, err
        assert "1 added, 1 updated" in out
        rows = {r["officer_id"]: r for r in await conn.fetch(
            f"select * from {SCHEMA}.officers where office_id = 'csw.prizren'")}
        assert rows["csw.prizren.duty"]["language"] == "en" and rows["csw.prizren.duty"]["on_duty"] is False
        assert rows["csw.prizren.night"]["phone"] == "+38344111222"
    finally:
        await conn.close()


async def test_alerts_committed_by_another_replica_reach_this_replicas_stream(env):
    """The SSE hub is fed by Postgres LISTEN/NOTIFY too, so an officer connected to replica A
    sees an alert that replica B's worker recorded."""
    from shared.db import create_pool
    from services.notifications.service import AlertHub, listen_for_alerts, record_event

    pool = await create_pool(env)
    hub = AlertHub()
    listener = None
    try:
        async with pool.acquire() as conn:
            await migrate(conn, schema=SCHEMA, folder=MIGRATIONS)
            await seed_if_empty(conn)
        queue = hub.subscribe("csw.prishtine.duty")
        listening = asyncio.Event()
        listener = asyncio.create_task(listen_for_alerts(env, pool, hub, listening=listening.set))
        await asyncio.wait_for(listening.wait(), 10)
        event = created(municipality="prishtine")
        other_replica = await asyncpg.connect(env.database_url)  # "replica B": its own connection
        try:
            t0 = time.monotonic()
            async with other_replica.transaction():
                alerts = await record_event(other_replica, envelope=event, settings=env)
            assert [a["recipient"] for a in alerts] == ["csw.prishtine.duty"]
            got = await asyncio.wait_for(queue.get(), 1.0)
            assert time.monotonic() - t0 < 1.0
            assert got["case_id"] == str(event.data.case_id) and got["id"] == alerts[0]["id"]
            assert hub.publish(alerts[0]) is False  # the same alert from the local path: pushed once
            # replaying the event changes nothing
            async with other_replica.transaction():
                assert await record_event(other_replica, envelope=event, settings=env) == []
        finally:
            await other_replica.close()
    finally:
        if listener:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        await pool.close()
