"""The referral API on the real broker and Postgres: who sees what, the state machine through
HTTP (409 naming the current status), scope 403s, and the events each action publishes."""

from __future__ import annotations

import uuid

import pytest

from services.referral.app import create_app
from shared.topics import Topics
from tests import builders
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.integration.test_referral_worker import db_rows, referral_events
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


def who(env, sub: str, agency: str, municipality: str, *roles: str) -> dict[str, str]:
    return bearer(env, sub=sub, agency=agency, municipality=municipality, roles=list(roles))


async def test_caseworkers_act_on_their_referrals_and_coordinators_see_the_municipality(env):
    topics = Topics(env.topic_prefix)
    case = builders.case_identified(municipality="prizren")  # -> csw.prizren + education.prizren
    other = builders.case_identified(municipality="ferizaj")
    await produce(env, topics.case_events, [(str(c.case_id).encode(), builders.envelope(c).to_json_bytes())
                                            for c in (case, other)])
    csw = who(env, "csw.prizren.duty", "csw", "prizren", "duty_officer")
    csw_sup = who(env, "csw.prizren.supervisor", "csw", "prizren", "supervisor")
    edu = who(env, "education.prizren.duty", "education", "prizren", "caseworker")
    csw_elsewhere = who(env, "csw.ferizaj.duty", "csw", "ferizaj", "duty_officer")
    coordinator = who(env, "coordinator.prizren", "coordinator", "prizren", "coordinator")
    reporter = who(env, "police.prizren.duty", "police", "prizren", "reporter")

    async with running(create_app(env)) as client:
        async def count() -> int:
            rows = await db_rows(env, "select count(*) as n from referral.referral")
            return rows[0]["n"] == 4
        await wait_until(count, timeout_s=30, what="four referrals to be opened")

        # --- who sees what ---------------------------------------------------------------
        assert (await client.get("/v1/referrals")).status_code == 401
        r = await client.get("/v1/referrals", headers=reporter)
        assert r.status_code == 403 and "caseworker" in r.json()["detail"]
        mine = (await client.get("/v1/referrals", headers=csw)).json()["items"]
        assert [(i["agency"], i["municipality"], i["office_id"]) for i in mine] == [("csw", "prizren", "csw.prizren")]
        ref = mine[0]
        assert ref["status"] == "pending" and ref["actions"] == ["acknowledge"]
        assert ref["rule_id"] == "csw-every-child" and ref["rule_version"] == 1
        assert ref["case_id"] == str(case.case_id) and ref["reported_by"] == case.reported_by
        for query in ({"agency": "education"}, {"municipality": "ferizaj"}):
            r = await client.get("/v1/referrals", params=query, headers=csw)
            assert r.status_code == 403, query
        r = await client.get("/v1/referrals", params={"municipality": "atlantis"}, headers=csw)
        assert r.status_code == 422 and "municipality" in r.json()["detail"]
        r = await client.get("/v1/referrals", params={"status": "lost"}, headers=csw)
        assert r.status_code == 422 and "status" in r.json()["detail"]
        everything = (await client.get("/v1/referrals", headers=coordinator)).json()["items"]
        assert {(i["agency"], i["municipality"]) for i in everything} == {("csw", "prizren"), ("education", "prizren")}
        by_case = (await client.get("/v1/referrals", params={"case_id": str(case.case_id), "agency": "education"},
                                    headers=coordinator)).json()["items"]
        assert [i["agency"] for i in by_case] == ["education"]
        assert (await client.get("/v1/referrals", params={"municipality": "ferizaj"},
                                 headers=coordinator)).status_code == 403
        edu_ref = by_case[0]

        rid = ref["referral_id"]
        assert (await client.get(f"/v1/referrals/{rid}", headers=csw_elsewhere)).status_code == 403
        assert (await client.get(f"/v1/referrals/{rid}", headers=edu)).status_code == 403
        assert (await client.get(f"/v1/referrals/{uuid.uuid4()}", headers=csw)).status_code == 404

        # --- the state machine through HTTP -----------------------------------------------
        r = await client.post(f"/v1/referrals/{rid}/accept", headers=csw)
        assert r.status_code == 409 and "pending" in r.json()["detail"]["message"]
        assert r.json()["detail"]["current_status"] == "pending"
        for intruder in (csw_elsewhere, edu, reporter):
            assert (await client.post(f"/v1/referrals/{rid}/acknowledge", headers=intruder)).status_code == 403
        r = await client.post(f"/v1/referrals/{rid}/acknowledge", headers=csw)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "acknowledged" and r.json()["acknowledged_at"]
        assert r.json()["actions"] == ["accept", "decline"]
        r = await client.post(f"/v1/referrals/{rid}/acknowledge", headers=csw)
        assert r.status_code == 409 and r.json()["detail"]["current_status"] == "acknowledged"
        r = await client.post(f"/v1/referrals/{rid}/decline", json={}, headers=csw)
        assert r.status_code == 422 and "reason" in r.json()["detail"]
        assert (await client.post(f"/v1/referrals/{rid}/accept", headers=csw_sup)).status_code == 200
        r = await client.post(f"/v1/referrals/{rid}/complete", json={"outcome": "sang_a_song"}, headers=csw)
        assert r.status_code == 422 and "outcome" in r.json()["detail"]
        r = await client.post(f"/v1/referrals/{rid}/complete", json={"outcome": "family_visited"}, headers=csw)
        assert r.status_code == 200 and r.json()["status"] == "completed"
        assert r.json()["outcome"] == "family_visited" and r.json()["actions"] == []
        r = await client.post(f"/v1/referrals/{rid}/decline", json={"reason": "other"}, headers=csw)
        assert r.status_code == 409 and "completed" in r.json()["detail"]["message"]

        # the coordinator may act too; a decline is escalated to them
        eid = edu_ref["referral_id"]
        assert (await client.post(f"/v1/referrals/{eid}/acknowledge", headers=coordinator)).status_code == 200
        r = await client.post(f"/v1/referrals/{eid}/decline", json={"reason": "not_in_mandate"}, headers=edu)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "declined" and body["decline_reason"] == "not_in_mandate"
        assert body["escalated"] and body["escalated_to"] == "coordinator.prizren"
        assert body["escalation_reason"] == "declined"

        detail = (await client.get(f"/v1/referrals/{rid}", headers=csw)).json()
        assert [(h["action"], h["actor"]) for h in detail["history"]] == [
            ("created", "referral"), ("acknowledge", "csw.prizren.duty"),
            ("accept", "csw.prizren.supervisor"), ("complete", "csw.prizren.duty")]
        assert detail["history"][1]["detail"] == {"within_deadline": True}
        done = (await client.get("/v1/referrals", params={"status": "completed"}, headers=coordinator)).json()
        assert [i["referral_id"] for i in done["items"]] == [rid]

        records = await read_all(env, topics.referral_events, min_count=4 + 6, timeout_s=20)

    events = referral_events(records)
    about_csw = [e for e in events if str(e.data.referral_id) == rid]
    assert [e.type for e in about_csw] == ["referral.created", "referral.acknowledged",
                                           "referral.accepted", "referral.completed"]
    ack = about_csw[1]
    assert ack.data.within_deadline is True and ack.data.actor is None  # who acted: the history only
    assert (ack.data.from_status.value, ack.data.to_status.value) == ("pending", "acknowledged")
    assert ack.source == "csw/prizren" and ack.subject == str(case.case_id)
    assert ack.correlationid == about_csw[0].correlationid
    assert about_csw[3].data.outcome.value == "family_visited"
    about_edu = [e for e in events if str(e.data.referral_id) == eid]
    assert [e.type for e in about_edu] == ["referral.created", "referral.acknowledged",
                                           "referral.declined", "referral.escalated"]
    assert about_edu[1].source == "coordinator/prizren"
    assert about_edu[2].data.reason.value == "not_in_mandate"
    assert about_edu[3].data.reason == "declined" and about_edu[3].data.escalated_to == "coordinator.prizren"
    assert len(events) == 4 + 6, "no event without a state change (403/409/422 publish nothing)"
