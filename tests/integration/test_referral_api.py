"""The referral API on the real broker and Postgres: who sees what, the state machine through
HTTP (409 naming the current status), scope 403s, and the events each action publishes.

Each test starts from two identified cases (prizren -> csw + education, ferizaj -> csw +
education), routed by the real worker, in a database and topics of its own."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from services.referral.app import create_app
from shared.events import CaseIdentified
from shared.topics import Topics
from tests import builders
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.integration.test_referral_worker import db_rows, referral_events
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


def who(env, sub: str, agency: str, municipality: str, *roles: str) -> dict[str, str]:
    return bearer(env, sub=sub, agency=agency, municipality=municipality, roles=list(roles))


@dataclass
class Routed:
    client: httpx.AsyncClient
    case: CaseIdentified  # prizren
    csw: dict[str, str]  # csw.prizren duty officer
    csw_sup: dict[str, str]
    edu: dict[str, str]  # education.prizren caseworker
    csw_elsewhere: dict[str, str]  # csw.ferizaj
    coordinator: dict[str, str]  # coordinator.prizren
    reporter: dict[str, str]  # a police reporter in prizren

    async def referral_of(self, agency: str) -> dict:
        page = await self.client.get("/v1/referrals", params={"case_id": str(self.case.case_id), "agency": agency},
                                     headers=self.coordinator)
        return page.json()["items"][0]


@contextlib.asynccontextmanager
async def routed(env) -> AsyncIterator[Routed]:
    case = builders.case_identified(municipality="prizren")  # -> csw.prizren + education.prizren
    other = builders.case_identified(municipality="ferizaj")
    await produce(env, Topics(env.topic_prefix).case_events,
                  [(str(c.case_id).encode(), builders.envelope(c).to_json_bytes()) for c in (case, other)])
    async with running(create_app(env)) as client:
        async def four() -> bool:
            rows = await db_rows(env, "select count(*) as n from referral.referral")
            return rows[0]["n"] == 4
        await wait_until(four, timeout_s=30, what="four referrals to be opened")
        yield Routed(
            client=client, case=case,
            csw=who(env, "csw.prizren.duty", "csw", "prizren", "duty_officer"),
            csw_sup=who(env, "csw.prizren.supervisor", "csw", "prizren", "supervisor"),
            edu=who(env, "education.prizren.duty", "education", "prizren", "caseworker"),
            csw_elsewhere=who(env, "csw.ferizaj.duty", "csw", "ferizaj", "duty_officer"),
            coordinator=who(env, "coordinator.prizren", "coordinator", "prizren", "coordinator"),
            reporter=who(env, "police.prizren.duty", "police", "prizren", "reporter"),
        )


async def test_staff_see_their_agency_in_their_municipality_and_a_wider_filter_is_403(env):
    async with routed(env) as r:
        client, case = r.client, r.case
        assert (await client.get("/v1/referrals")).status_code == 401
        answer = await client.get("/v1/referrals", headers=r.reporter)
        assert answer.status_code == 403 and "caseworker" in answer.json()["detail"]
        mine = (await client.get("/v1/referrals", headers=r.csw)).json()["items"]
        assert [(i["agency"], i["municipality"], i["office_id"]) for i in mine] == [("csw", "prizren", "csw.prizren")]
        ref = mine[0]
        assert ref["status"] == "pending" and ref["actions"] == ["acknowledge"]
        assert ref["rule_id"] == "csw-every-child" and ref["rule_version"] == 1
        assert ref["case_id"] == str(case.case_id) and ref["reported_by"] == case.reported_by
        for query in ({"agency": "education"}, {"municipality": "ferizaj"}):
            answer = await client.get("/v1/referrals", params=query, headers=r.csw)
            assert answer.status_code == 403, query
        answer = await client.get("/v1/referrals", params={"municipality": "atlantis"}, headers=r.csw)
        assert answer.status_code == 422 and "municipality" in answer.json()["detail"]
        answer = await client.get("/v1/referrals", params={"status": "lost"}, headers=r.csw)
        assert answer.status_code == 422 and "status" in answer.json()["detail"]


async def test_the_coordinator_sees_the_whole_municipality_and_no_other(env):
    async with routed(env) as r:
        client = r.client
        everything = (await client.get("/v1/referrals", headers=r.coordinator)).json()["items"]
        assert {(i["agency"], i["municipality"]) for i in everything} == {("csw", "prizren"), ("education", "prizren")}
        by_case = (await client.get("/v1/referrals", params={"case_id": str(r.case.case_id), "agency": "education"},
                                    headers=r.coordinator)).json()["items"]
        assert [i["agency"] for i in by_case] == ["education"]
        answer = await client.get("/v1/referrals", params={"municipality": "ferizaj"}, headers=r.coordinator)
        assert answer.status_code == 403


async def test_one_referral_is_403_outside_its_office_and_404_when_unknown(env):
    async with routed(env) as r:
        rid = (await r.referral_of("csw"))["referral_id"]
        assert (await r.client.get(f"/v1/referrals/{rid}", headers=r.csw_elsewhere)).status_code == 403
        assert (await r.client.get(f"/v1/referrals/{rid}", headers=r.edu)).status_code == 403
        answer = await r.client.get(f"/v1/referrals/{uuid.uuid4()}", headers=r.csw)
        assert answer.status_code == 404 and answer.json()["detail"].startswith("no referral ")


async def test_the_state_machine_through_http_answers_409_naming_the_current_status(env):
    """acknowledge -> accept -> complete by the receiving office; every illegal step is a 409
    whose detail is {"message", "current_status"}, every intruder a 403, every bad body a 422;
    the history names who did what, and only the four real changes are published."""
    async with routed(env) as r:
        client, csw = r.client, r.csw
        rid = (await r.referral_of("csw"))["referral_id"]
        answer = await client.post(f"/v1/referrals/{rid}/accept", headers=csw)
        assert answer.status_code == 409 and answer.json()["detail"] == {
            "message": "cannot accept a referral that is pending; from pending you may acknowledge",
            "current_status": "pending"}
        for intruder in (r.csw_elsewhere, r.edu, r.reporter):
            assert (await client.post(f"/v1/referrals/{rid}/acknowledge", headers=intruder)).status_code == 403
        answer = await client.post(f"/v1/referrals/{rid}/acknowledge", headers=csw)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "acknowledged" and answer.json()["acknowledged_at"]
        assert answer.json()["actions"] == ["accept", "decline"]
        answer = await client.post(f"/v1/referrals/{rid}/acknowledge", headers=csw)
        assert answer.status_code == 409 and answer.json()["detail"]["current_status"] == "acknowledged"
        answer = await client.post(f"/v1/referrals/{rid}/decline", json={}, headers=csw)
        assert answer.status_code == 422 and "reason" in answer.json()["detail"]
        assert (await client.post(f"/v1/referrals/{rid}/accept", headers=r.csw_sup)).status_code == 200
        answer = await client.post(f"/v1/referrals/{rid}/complete", json={"outcome": "sang_a_song"}, headers=csw)
        assert answer.status_code == 422 and "outcome" in answer.json()["detail"]
        answer = await client.post(f"/v1/referrals/{rid}/complete", json={"outcome": "family_visited"}, headers=csw)
        assert answer.status_code == 200 and answer.json()["status"] == "completed"
        assert answer.json()["outcome"] == "family_visited" and answer.json()["actions"] == []
        answer = await client.post(f"/v1/referrals/{rid}/decline", json={"reason": "other"}, headers=csw)
        assert answer.status_code == 409 and "completed" in answer.json()["detail"]["message"]

        detail = (await client.get(f"/v1/referrals/{rid}", headers=csw)).json()
        assert [(h["action"], h["actor"]) for h in detail["history"]] == [
            ("created", "referral"), ("acknowledge", "csw.prizren.duty"),
            ("accept", "csw.prizren.supervisor"), ("complete", "csw.prizren.duty")]
        assert detail["history"][1]["detail"] == {"within_deadline": True}
        done = (await client.get("/v1/referrals", params={"status": "completed"}, headers=r.coordinator)).json()
        assert [i["referral_id"] for i in done["items"]] == [rid]
        records = await read_all(env, Topics(env.topic_prefix).referral_events, min_count=4 + 3, timeout_s=20)

    events = referral_events(records)
    about = [e for e in events if str(e.data.referral_id) == rid]
    assert [e.type for e in about] == ["referral.created", "referral.acknowledged",
                                       "referral.accepted", "referral.completed"]
    ack = about[1]
    assert ack.data.within_deadline is True and ack.data.actor is None  # who acted: the history only
    assert (ack.data.from_status.value, ack.data.to_status.value) == ("pending", "acknowledged")
    assert ack.source == "csw/prizren" and ack.subject == str(r.case.case_id)
    assert ack.correlationid == about[0].correlationid
    assert about[3].data.outcome.value == "family_visited"
    assert len(events) == 4 + 3, "no event without a state change (403/409/422 publish nothing)"


async def test_the_coordinator_may_act_and_a_decline_is_escalated_to_them(env):
    async with routed(env) as r:
        eid = (await r.referral_of("education"))["referral_id"]
        assert (await r.client.post(f"/v1/referrals/{eid}/acknowledge", headers=r.coordinator)).status_code == 200
        answer = await r.client.post(f"/v1/referrals/{eid}/decline", json={"reason": "not_in_mandate"}, headers=r.edu)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "declined" and body["decline_reason"] == "not_in_mandate"
        assert body["escalated"] and body["escalated_to"] == "coordinator.prizren"
        assert body["escalation_reason"] == "declined"
        records = await read_all(env, Topics(env.topic_prefix).referral_events, min_count=4 + 3, timeout_s=20)

    about = [e for e in referral_events(records) if str(e.data.referral_id) == eid]
    assert [e.type for e in about] == ["referral.created", "referral.acknowledged",
                                       "referral.declined", "referral.escalated"]
    assert about[1].source == "coordinator/prizren"
    assert about[2].data.reason.value == "not_in_mandate"
    assert about[3].data.reason == "declined" and about[3].data.escalated_to == "coordinator.prizren"
