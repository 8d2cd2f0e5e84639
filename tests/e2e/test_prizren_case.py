"""End to end, the whole system as `make run` starts it (embedded broker and PostgreSQL, the SMTP
sink, four services as separate processes):

a police officer identifies a 12-year-old collecting scrap metal in Prizren -> referrals to the
Centre for Social Work and the Education Directorate of Prizren -> the on-duty officers of both
offices have an e-mail and an inbox entry -> Prizren's counts and funnel go up by one -> a CSW
caseworker acknowledges, accepts and completes -> the funnel follows. The same through an
agency system publishing onto clms.agency-inbound with librdkafka (confluent-kafka), not ours:
signed by its office (JWS), the personal part encrypted to intake's public key (JWE).
Afterwards every topic (the inbound one too) and every log line is scanned for the personal data
that was sent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from datetime import date, timedelta

import httpx
import pytest

from shared.topics import Topic, Topics
from tests.e2e.harness import System, running_system
from tests.infra import wait_until
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.e2e

# Personal data sent in this module; none of it may appear on any topic (the ingress topic agency
# systems write to included: its personal part is encrypted) or in a log line.
CHILD = {"given_name": "Qendresa", "family_name": "Xhemajlitestaj"}
GUARDIAN = {"name": "Mirlindatest Xhemajlitestaj", "relationship": "mother", "phone": "+383 44 987 654"}
NOTES = "Seen near the Lumbardhi bridge with a cart, Rruga e Testimit 17"
DOB = (date.today() - timedelta(days=12 * 365 + 100)).isoformat()
PERSONAL_VALUES = [CHILD["given_name"], CHILD["family_name"], GUARDIAN["name"], "987 654", "Lumbardhi", DOB,
                   "Inboundtestova", "Rexhepitestaj"]


@pytest.fixture(scope="module")
async def system(tmp_path_factory):
    async with running_system(tmp_path_factory.mktemp("e2e")) as s:
        yield s


def identification(municipality: str = "prizren") -> dict:
    return {
        "municipality": municipality,
        "identified_on": date.today().isoformat(),
        "report_source": "officer",
        "child": {**CHILD, "date_of_birth": DOB, "sex": "female", "community": "roma",
                  "school_status": "dropped_out", "guardian": GUARDIAN},
        "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection", "hazardous": True,
                 "employer_involved": False},
        "notes": NOTES,
    }


def coordinator(system: System, municipality: str) -> dict[str, str]:
    return system.headers(sub=f"coordinator.{municipality}", agency="coordinator",
                          municipality=municipality, roles=["coordinator"])


def officer(system: System, agency: str, municipality: str, role: str = "duty_officer") -> dict[str, str]:
    kind = "supervisor" if role == "supervisor" else "duty"
    return system.headers(sub=f"{agency}.{municipality}.{kind}", agency=agency, municipality=municipality,
                          roles=[role, "caseworker"])


async def prizren_numbers(client: httpx.AsyncClient, system: System, municipality: str = "prizren") -> dict:
    r = await client.get(f"{system.url('analytics')}/v1/counts/municipalities/{municipality}",
                         headers=coordinator(system, municipality))
    r.raise_for_status()
    body = r.json()
    assert body["exact"] is True, "a coordinator sees exact figures for their municipality"
    return {"identified": body["identified"], **body["funnel"]}


async def referrals_of(client: httpx.AsyncClient, system: System, *, municipality: str, **params) -> list[dict]:
    r = await client.get(f"{system.url('referral')}/v1/referrals", params={"municipality": municipality, **params},
                         headers=coordinator(system, municipality))
    r.raise_for_status()
    return r.json()["items"]


@dataclass
class Journey:
    """A police officer's identification in Prizren and its two referrals, made once per module
    (the `prizren_journey` fixture) for every test that reads what it left, in any order."""

    system: System
    case_id: str
    before: dict  # Prizren's counts before it
    referrals: list[dict]
    police: dict[str, str]
    actions: dict[str, httpx.Response] = field(default_factory=dict)

    async def complete_csw_referral(self, client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        """The CSW caseworker acknowledges, accepts and completes (once; later calls return the answers)."""
        if not self.actions:
            csw = next(i for i in self.referrals if i["agency"] == "csw")
            base = f"{self.system.url('referral')}/v1/referrals/{csw['referral_id']}"
            for action, body in (("acknowledge", None), ("accept", None), ("complete", {"outcome": "family_visited"})):
                r = await client.post(f"{base}/{action}", json=body or {},
                                      headers=officer(self.system, "csw", "prizren"))
                assert r.status_code == 200, f"{action}: {r.status_code} {r.text}"
                self.actions[action] = r
        return self.actions


@pytest.fixture(scope="module")
async def prizren_journey(system) -> Journey:
    async with httpx.AsyncClient(timeout=20) as client:
        before = await prizren_numbers(client, system)
        police = system.headers(sub="police.prizren.duty", agency="police", municipality="prizren",
                                roles=["reporter"])
        r = await client.post(f"{system.url('intake')}/v1/identifications", json=identification(),
                              headers={**police, "Idempotency-Key": str(uuid.uuid4())})
        assert r.status_code == 201, r.text
        case_id = r.json()["case_id"]

        async def both_referrals():
            items = await referrals_of(client, system, municipality="prizren", case_id=case_id)
            return items if {i["agency"] for i in items} >= {"csw", "education"} else None

        referrals = await wait_until(both_referrals, timeout_s=30, what="referrals to CSW and education")
    return Journey(system, case_id, before, referrals, police)


@pytest.mark.smoke
async def test_police_identification_in_prizren_reaches_both_agencies_their_officers_and_the_counts(system, prizren_journey):
    journey = prizren_journey
    case_id, before, referrals, police = journey.case_id, journey.before, journey.referrals, journey.police
    async with httpx.AsyncClient(timeout=20) as client:
        assert {i["agency"] for i in referrals} == {"csw", "education"}
        assert {i["office_id"] for i in referrals} == {"csw.prizren", "education.prizren"}
        assert all(i["status"] == "pending" and i["deadline"] for i in referrals)

        for agency in ("csw", "education"):
            async def alert(agency: str = agency):
                r = await client.get(f"{system.url('notifications')}/v1/inbox", headers=officer(system, agency, "prizren"))
                r.raise_for_status()
                return [a for a in r.json()["items"] if a["case_id"] == case_id]
            alerts = await wait_until(alert, timeout_s=30, what=f"an inbox alert for {agency}.prizren.duty")
            assert "referral.created" in [a["event_type"] for a in alerts], alerts

            async def mail(agency: str = agency):
                r = await client.get(f"{system.mail_url}/messages")
                return [m for m in r.json() if m["recipient"] == f"{agency}.prizren.duty" and case_id in m["body"]]
            mails = await wait_until(mail, timeout_s=30, what=f"an e-mail to {agency}.prizren.duty")
            assert len(mails) == 1

        async def counted():
            now = await prizren_numbers(client, system)
            return now if now["identified"] == before["identified"] + 1 and now["referred"] == before["referred"] + 1 else None
        await wait_until(counted, timeout_s=30, what="Prizren's identified and referred counts to go up by one")

        answers = await journey.complete_csw_referral(client)
        assert answers["complete"].json()["status"] == "completed"

        async def funnel_followed():
            now = await prizren_numbers(client, system)
            ok = all(now[k] == before[k] + 1 for k in ("acknowledged_in_time", "accepted", "completed"))
            return now if ok else None
        await wait_until(funnel_followed, timeout_s=30, what="the funnel to follow acknowledge/accept/complete")

        async def reporter_told():
            r = await client.get(f"{system.url('notifications')}/v1/inbox", headers=police)
            return [a for a in r.json()["items"] if a["case_id"] == case_id and a["event_type"] == "referral.completed"]
        await wait_until(reporter_told, timeout_s=30, what="the reporting officer to hear the referral was completed")

        # /metrics: 404 on every public API port; served on each monitoring port, and the open
        # referrals gauge has no municipality label (issue 15: no side channel of small counts)
        for name in ("intake", "referral", "notifications", "analytics"):
            assert (await client.get(f"{system.url(name)}/metrics")).status_code == 404, name
            r = await client.get(f"{system.metrics_url(name)}/metrics")
            assert r.status_code == 200 and "clms_events_consumed_total" in r.text, name
        text = (await client.get(f"{system.metrics_url('referral')}/metrics")).text
        open_now = [ln for ln in text.splitlines() if ln.startswith("clms_referrals_open_now{")]
        assert open_now and not any("municipality" in ln for ln in open_now), open_now


@dataclass
class Submission:
    """An identification an agency system published onto clms.agency-inbound, once per module."""

    municipality: str
    before: dict  # the municipality's counts before it
    referrals: list[dict]


@pytest.fixture(scope="module")
async def agency_submission(system) -> Submission:
    from confluent_kafka import Producer

    from services.intake.inbound import public_key
    from shared.inbound import inbound_message

    municipality = "gjakove"
    async with httpx.AsyncClient(timeout=20) as client:
        before = await prizren_numbers(client, system, municipality)
        event = {
            "specversion": "1.0", "id": f"pol-gjk-{uuid.uuid4()}", "source": f"police/{municipality}",
            "type": "identification.submitted", "time": "2026-11-23T08:00:00Z",
            "datacontenttype": "application/json",
            "data": {**identification(municipality),
                     "child": {**identification(municipality)["child"], "given_name": "Inboundtestova",
                               "family_name": "Rexhepitestaj"}},
        }
        producer = Producer({"bootstrap.servers": system.settings.kafka_bootstrap_servers,
                             "enable.idempotence": False, "acks": "all", "client.id": "agency-system"})
        delivered = []
        # what the agency system publishes: its office's signature over the CloudEvent, the personal
        # part encrypted to the key `clms inbound-key` prints (here: the same settings' key)
        value = inbound_message(event, recipient=public_key(system.settings))
        producer.produce(Topics(system.settings.topic_prefix).agency_inbound, key=event["id"].encode(),
                         value=value, on_delivery=lambda err, msg: delivered.append(err))
        await asyncio.get_running_loop().run_in_executor(None, producer.flush, 15)
        assert delivered == [None], delivered

        async def referred():
            items = await referrals_of(client, system, municipality=municipality)
            return items if {i["agency"] for i in items} >= {"csw", "education"} else None
        items = await wait_until(referred, timeout_s=30, what="referrals for the inbound identification")
    return Submission(municipality, before, items)


async def test_an_agency_system_publishing_with_librdkafka_gets_the_same_result(system, agency_submission):
    municipality, before = agency_submission.municipality, agency_submission.before
    assert {i["office_id"] for i in agency_submission.referrals} >= {f"csw.{municipality}", f"education.{municipality}"}
    async with httpx.AsyncClient(timeout=20) as client:
        async def alerted():
            r = await client.get(f"{system.url('notifications')}/v1/inbox", headers=officer(system, "csw", municipality))
            return r.json()["items"]
        await wait_until(alerted, timeout_s=30, what=f"an alert for csw.{municipality}.duty")

        async def counted():
            now = await prizren_numbers(client, system, municipality)
            return now["identified"] == before["identified"] + 1
        await wait_until(counted, timeout_s=30, what=f"{municipality}'s count to go up by one")


async def test_no_personal_data_on_any_topic_or_in_any_log_line(system, prizren_journey, agency_submission):
    """After the two journeys (the fixtures make them, whatever ran before)."""
    topics = Topics(system.settings.topic_prefix)
    scanned = 0
    inbound = 0
    for topic in Topic:
        for record in await read_all(system.settings, topics.name(topic), timeout_s=10, idle_s=0.3):
            scanned += 1
            inbound += topic is Topic.agency_inbound
            text = (record.value or b"").decode(errors="replace") + str(record.headers)
            leaked = [v for v in PERSONAL_VALUES if v in text]
            assert not leaked, f"{leaked} found on {record.topic}[{record.partition}]@{record.offset}"
    print(f"\n[e2e] scanned {scanned} records on {len(Topic)} topics ({inbound} inbound): no personal data")
    assert scanned > 10 and inbound >= 1
    logs = sorted(system.sup.log_dir.glob("*.log"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        leaked = [v for v in PERSONAL_VALUES if v in text]
        assert not leaked, f"{leaked} found in {path.name}"


def clms(system: System, *args: str) -> subprocess.CompletedProcess:
    env = {"KAFKA_BOOTSTRAP_SERVERS": system.settings.kafka_bootstrap_servers,
           "DATABASE_URL": system.settings.database_url, "CLMS_TOPIC_PREFIX": system.settings.topic_prefix,
           "PATH": "/usr/bin:/bin", "COLUMNS": "250",
           **{k: str(getattr(system.settings, f"{s}_port")) for k, s in
              (("INTAKE_PORT", "intake"), ("REFERRAL_PORT", "referral"), ("NOTIFICATIONS_PORT", "notifications"),
               ("ANALYTICS_PORT", "analytics"))}}
    return subprocess.run([str(Path(sys.executable).with_name("clms")), *args], env=env, capture_output=True,
                          text=True, timeout=120)


async def test_clms_trace_tells_the_story_of_the_prizren_case(system, prizren_journey):
    case_id = prizren_journey.case_id
    async with httpx.AsyncClient(timeout=20) as client:
        await prizren_journey.complete_csw_referral(client)

        async def told():  # the notification of the caseworker's completion is the story's last line
            r = await client.get(f"{system.url('notifications')}/v1/inbox", headers=prizren_journey.police)
            return [a for a in r.json()["items"] if a["case_id"] == case_id and a["event_type"] == "referral.completed"]
        await wait_until(told, timeout_s=30, what="the reporting officer to hear the referral was completed")
    expected = ("case.identified", "referral.created", "notification.sent", "referral.acknowledged",
                "referral.accepted", "referral.completed")
    told_so_far: list[str] = []  # the story `clms trace --json` told last, for the failure message

    def whole_story() -> list[str] | None:
        out = clms(system, "trace", case_id, "--json")
        assert out.returncode == 0, out.stderr
        story = json.loads(out.stdout)
        rows = story.get("events", story) if isinstance(story, dict) else story
        told_so_far[:] = [r["type"] for r in rows if r["type"].split(".")[0] in ("case", "referral", "notification")]
        return list(told_so_far) if set(expected) <= set(told_so_far) else None
    try:
        types = await wait_until(whole_story, timeout_s=60, interval_s=1, what="clms trace to tell the whole story")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; clms trace --json told: {told_so_far}") from None
    out = clms(system, "trace", case_id)
    assert out.returncode == 0, out.stderr
    assert "clms.case-events" in out.stdout, "piped output names whole topics"
    assert types[0] == "case.identified", out.stdout
    assert types.index("referral.created") < types.index("referral.acknowledged") \
        < types.index("referral.accepted") < types.index("referral.completed")
    assert "referral" in out.stdout and "notifications" in out.stdout and "police/prizren" in out.stdout
    print(f"\n[e2e] clms trace: {len(types)} events, {types[0]} -> {types[-1]}")


async def test_clms_lag_and_status_while_a_worker_is_down_and_after(system):
    status = clms(system, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("ready") >= 4, status.stdout

    last_lag: list = []  # what `clms lag --json` said last, for the failure message
    system.kill("notifications")
    try:
        async with httpx.AsyncClient(timeout=20) as client:
            police = system.headers(sub="police.peje.duty", agency="police", municipality="peje", roles=["reporter"])
            for _ in range(3):
                r = await client.post(f"{system.url('intake')}/v1/identifications", json=identification("peje"),
                                      headers=police)
                assert r.status_code == 201, r.text

        def notifications_lag() -> int:
            out = clms(system, "lag", "--json")
            assert out.returncode == 0, out.stderr
            rows = json.loads(out.stdout)
            rows = rows.get("lag", rows) if isinstance(rows, dict) else rows
            last_lag[:] = rows
            return sum(r["lag"] for r in rows
                       if r["group"].endswith("notifications") and r["topic"].endswith("referral-events"))

        try:
            behind = await wait_until(notifications_lag, timeout_s=60, interval_s=1, what="notifications lag to show")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; clms lag --json said: {last_lag}") from None
        assert behind > 0
    finally:
        system.restart("notifications")
    await wait_until(lambda: notifications_lag() == 0, timeout_s=90, what="notifications to catch up", interval_s=1)
    print(f"\n[e2e] clms lag: notifications {behind} behind while stopped, 0 after restart")
