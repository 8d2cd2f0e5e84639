"""Intake over HTTP against the real broker and Postgres: identifications become pseudonymous
case events, Idempotency-Key, child linking, scope rules, audit, follow-up events, 503 when the
database is away, crypto-erasure."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import date, timedelta

import asyncpg
import pytest

from shared.events import AgencyType, parse_envelope
from shared.topics import Topics
from services.intake import service
from services.intake.app import create_app
from tests.apps import bearer, running
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration

PERSONAL = ["Arb", "Krasniqi", "2014-03-09", "+383 44 123 456", "Shpresa", "seen near the bus station"]


def identification(**over) -> dict:
    body = {
        "municipality": "prizren",
        "identified_on": date.today().isoformat(),
        "report_source": "officer",
        "child": {
            "given_name": "Arbër", "family_name": "Krasniqi", "date_of_birth": "2014-03-09", "sex": "male",
            "community": "roma", "school_status": "dropped_out",
            "guardian": {"name": "Shpresa Krasniqi", "relationship": "mother", "phone": "+383 44 123 456"},
        },
        "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection", "hazardous": True,
                 "employer_involved": False},
        "notes": "seen near the bus station",
    }
    body.update(over)
    return body


def police(env, municipality="prizren", roles=("reporter",), sub=None):
    return bearer(env, sub=sub or f"police.{municipality}.duty", agency="police", municipality=municipality,
                  roles=list(roles))


def officer(env, agency, municipality, roles=("caseworker",)):
    sub = f"coordinator.{municipality}" if agency == "coordinator" else f"{agency}.{municipality}.duty"
    return bearer(env, sub=sub, agency=agency, municipality=municipality, roles=list(roles))


async def audit_rows(env, case_id) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(env.database_url)
    try:
        return await conn.fetch("select * from intake.audit where case_id = $1 order by id", case_id)
    finally:
        await conn.close()


async def test_identification_is_published_without_personal_data_and_readable_by_the_reporter(env):
    topics = Topics(env.topic_prefix)
    async with running(create_app(env, run_consumer=False)) as client:
        r = await client.post("/v1/identifications", json=identification(), headers=police(env))
        assert r.status_code == 201, r.text
        answer = r.json()
        case_id = answer["case_id"]
        assert answer["child_ref"].startswith("ct_") and answer["linked_case_id"] is None
        assert answer["repeat_identification"] is False
        assert r.headers["location"] == f"/v1/cases/{case_id}"

        records = await read_all(env, topics.case_events, min_count=1)
        assert len(records) == 1
        raw = records[0].value
        for secret in PERSONAL:
            assert secret.encode() not in raw, f"{secret!r} leaked onto {topics.case_events}"
        env_ = parse_envelope(raw)
        assert env_.type == "case.identified" and env_.subject == case_id and records[0].key == case_id.encode()
        data = env_.data
        assert str(data.case_id) == case_id and data.child_ref == answer["child_ref"]
        assert data.age_band.value == "10_14" and data.compulsory_school_age and data.hazardous
        assert data.reported_by == "police.prizren.duty" and data.reporter_agency.value == "police"
        assert env_.source == "police/prizren"

        got = await client.get(f"/v1/cases/{case_id}", headers=police(env, sub="police.prizren.supervisor",
                                                                      roles=("supervisor",)))
        assert got.status_code == 200, got.text
        view = got.json()
        assert view["personal"]["given_name"] == "Arbër"
        assert view["personal"]["guardian"]["phone"] == "+383 44 123 456"
        assert view["personal"]["notes"] == "seen near the bus station"
        assert view["age_at_identification"] >= 11 and view["status"] == "open"
        assert [h["type"] for h in view["history"]] == ["case.identified"]

    # nothing personal in the database in clear text either
    conn = await asyncpg.connect(env.database_url)
    try:
        row = await conn.fetchrow("select * from intake.cases where case_id = $1", uuid.UUID(case_id))
        assert b"Krasniqi" not in row["pii_ciphertext"]
        assert "Krasniqi" not in str(dict(row))
        published = await conn.fetchval("select count(*) from intake.outbox where published_at is not null")
        assert published == 1
    finally:
        await conn.close()


async def test_idempotency_key_returns_the_first_answer_and_refuses_another_body(env):
    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        headers = {**police(env), "Idempotency-Key": "req-42"}
        first = await client.post("/v1/identifications", json=identification(), headers=headers)
        again = await client.post("/v1/identifications", json=identification(), headers=headers)
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()
        assert again.headers.get("idempotent-replayed") == "true"

        other = await client.post("/v1/identifications", json=identification(notes="another child"), headers=headers)
        assert other.status_code == 422
        assert "Idempotency-Key 'req-42' was already used for a different identification" in other.json()["detail"]

        # the key belongs to its subject: another officer's identical key is a new request
        theirs = await client.post("/v1/identifications", json=identification(),
                                   headers={**police(env, sub="police.prizren.other"), "Idempotency-Key": "req-42"})
        assert theirs.status_code == 201 and theirs.json()["case_id"] != first.json()["case_id"]

    conn = await asyncpg.connect(env.database_url)
    try:
        assert await conn.fetchval("select count(*) from intake.cases") == 2
        assert await conn.fetchval("select count(*) from intake.outbox") == 2
    finally:
        await conn.close()


async def test_two_agencies_reporting_one_child_link_inside_intake_only(env):
    """Intake still recognises a second report of one child (same normalised names and birth
    year), but the topic carries a per-case token and no link, and a reporter learns the earlier
    case's id only when allowed to read that case."""
    topics = Topics(env.topic_prefix)
    async with running(create_app(env, run_consumer=False)) as client:
        first = await client.post("/v1/identifications", json=identification(), headers=police(env))
        age = date.today().year - 2014
        second_body = identification(
            municipality="prishtine",
            child={"given_name": "  ARBER ", "family_name": "krasniqi", "estimated_age": age, "sex": "unknown"},
            work={"sector": "begging", "activity": "forced_begging"}, notes=None)
        second = await client.post("/v1/identifications", json=second_body,
                                   headers=officer(env, "csw", "prishtine", roles=("reporter",)))
        assert first.status_code == second.status_code == 201, second.text
        # per-case tokens: two cases of one child carry unrelated child_refs
        assert second.json()["child_ref"] != first.json()["child_ref"]
        assert second.json()["child_ref"].startswith("ct_")
        # csw/prishtine may not read police/prizren's case: it learns a repeat, not which case
        assert second.json()["repeat_identification"] is True and second.json()["linked_case_id"] is None
        # the first reporter may read both of its own cases: it gets the link
        third = await client.post("/v1/identifications", json=identification(), headers=police(env))
        assert third.json()["linked_case_id"] == first.json()["case_id"]
        assert third.json()["repeat_identification"] is True
        view = (await client.get(f"/v1/cases/{third.json()['case_id']}", headers=police(env))).json()
        assert view["linked_case_id"] == first.json()["case_id"] and view["repeat_identification"] is True
        assert view["child_ref"] == third.json()["child_ref"]
        other_child = await client.post(
            "/v1/identifications", headers=police(env),
            json=identification(child={**identification()["child"], "given_name": "Besnik"}))
        assert other_child.json()["repeat_identification"] is False
        assert other_child.json()["linked_case_id"] is None

        records = await read_all(env, topics.case_events, min_count=4)
        by_case = {parse_envelope(r.value).subject: parse_envelope(r.value).data for r in records}
        for answer in (first, second, third):
            published = by_case[answer.json()["case_id"]]
            assert published.child_ref == answer.json()["child_ref"] and published.linked_case_id is None
            assert published.identified_on is None and published.activity is None
            assert published.identified_month == date.today().strftime("%Y-%m")
        assert by_case[second.json()["case_id"]].worst_form
        for r in records:  # no link between cases of one child on the topic
            assert first.json()["case_id"].encode() not in r.value or parse_envelope(r.value).subject == first.json()["case_id"]


async def test_scope_rules_and_an_audit_row_for_every_read(env):
    topics = Topics(env.topic_prefix)
    async with running(create_app(env)) as client:
        case_id = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()["case_id"]
        url = f"/v1/cases/{case_id}"

        assert (await client.get(url)).status_code == 401
        denied = await client.get(url, headers=police(env, "prishtine", roles=("caseworker",)))
        assert denied.status_code == 403 and "may not see case" in denied.json()["detail"]
        assert (await client.get(url, headers=officer(env, "csw", "prizren"))).status_code == 403
        assert (await client.get(url, headers=officer(env, "coordinator", "prishtine", ("coordinator",)))).status_code == 403
        assert (await client.get(url, headers=officer(env, "coordinator", "prizren", ("coordinator",)))).status_code == 200
        assert (await client.get(url, headers=police(env))).status_code == 200

        # referral.created for csw/prizren arrives on clms.referral-events: now csw prizren may read it
        from tests import builders
        from shared import events as ev
        from tests.kafka_helpers import produce
        created = builders.one_of_each()[5].model_copy(update={"case_id": uuid.UUID(case_id)})
        envelope = builders.envelope(created, source="referral")
        await produce(env, topics.referral_events, [(envelope.key, envelope.to_json_bytes())] * 2)  # twice: dedupe
        assert isinstance(created, ev.ReferralCreated)

        async def csw_can_read():
            return (await client.get(url, headers=officer(env, "csw", "prizren"))).status_code == 200
        from tests.infra import wait_until
        await wait_until(csw_can_read, timeout_s=20, what="csw prizren to gain access from referral.created")

        # only reporters of identifying agencies create identifications
        assert (await client.post("/v1/identifications", json=identification(),
                                  headers=officer(env, "prosecution", "prizren", ("reporter",)))).status_code == 403
        assert (await client.post("/v1/identifications", json=identification(),
                                  headers=police(env, roles=("caseworker",)))).status_code == 403

    rows = await audit_rows(env, uuid.UUID(case_id))
    reads = [r for r in rows if r["action"] == "case.read"]
    assert [r["outcome"] for r in reads][:5] == ["denied", "denied", "denied", "ok", "ok"]
    assert reads[0]["actor"] == "police.prishtine.duty" and reads[0]["actor_municipality"] == "prishtine"
    assert all(r["client_addr"] for r in reads) and reads[-1]["outcome"] == "ok"
    assert [r["action"] for r in rows][0] == "case.create"
    conn = await asyncpg.connect(env.database_url)
    try:
        assert await conn.fetchval("select count(*) from intake.case_access") == 1
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute("update intake.audit set actor = 'someone else'")
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute("delete from intake.audit")
    finally:
        await conn.close()


async def test_follow_up_events_are_published_and_a_closed_case_takes_no_more(env):
    topics = Topics(env.topic_prefix)
    async with running(create_app(env, run_consumer=False)) as client:
        case_id = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()["case_id"]
        url = f"/v1/cases/{case_id}/events"
        today = date.today().isoformat()
        coord = officer(env, "coordinator", "prizren", ("coordinator",))
        # the reporting office's supervisor (hazardous needs case.reclassify: shared/access_policy.yaml)
        supervisor = police(env, roles=("supervisor", "caseworker", "reporter"), sub="police.prizren.supervisor")
        for body in ({"type": "updated", "school_status": "enrolled_irregular", "hazardous": False},
                     {"type": "child_withdrawn", "on": today},
                     {"type": "school_enrolled", "on": today}):
            r = await client.post(url, json=body, headers=supervisor)
            assert r.status_code == 201, r.text
        bad = await client.post(url, json={"type": "closed", "on": today, "reason": "bored"}, headers=coord)
        assert bad.status_code == 422 and "reason" in bad.json()["detail"] and "resolved" in bad.json()["detail"]
        unknown = await client.post(url, json={"type": "exploded", "on": today}, headers=coord)
        assert unknown.status_code == 422 and "child_withdrawn" in unknown.json()["detail"]
        future = await client.post(url, json={"type": "child_withdrawn",
                                              "on": (date.today() + timedelta(days=5)).isoformat()}, headers=coord)
        assert future.status_code == 422 and "on: must not be in the future" in future.json()["detail"]
        closed = await client.post(url, json={"type": "closed", "on": today, "reason": "resolved"}, headers=coord)
        assert closed.status_code == 201 and closed.json()["status"] == "closed"
        again = await client.post(url, json={"type": "child_withdrawn", "on": today}, headers=coord)
        assert again.status_code == 409
        assert (await client.post(url, json={"type": "child_withdrawn", "on": today},
                                  headers=police(env, "prishtine"))).status_code == 403
        assert (await client.post(f"/v1/cases/{uuid.uuid4()}/events", json={"type": "child_withdrawn", "on": today},
                                  headers=coord)).status_code == 404

        records = await read_all(env, topics.case_events, min_count=5)
        types = [parse_envelope(r.value).type for r in records]
        assert types == ["case.identified", "case.updated", "case.child_withdrawn", "case.school_enrolled",
                         "case.closed"]
        closed_event = parse_envelope(records[-1].value)
        assert closed_event.data.confirmed_by_agency.value == "coordinator"
        view = (await client.get(f"/v1/cases/{case_id}", headers=police(env))).json()
        assert view["status"] == "closed" and view["school_status"] == "enrolled_attending"
        assert not view["hazardous"]


async def test_validation_errors_name_the_field_and_malformed_json_is_a_4xx(env):
    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        h = police(env)
        r = await client.post("/v1/identifications", json=identification(municipality="atlantis"), headers=h)
        assert r.status_code == 422 and "municipality: unknown municipality 'atlantis'" in r.json()["detail"]
        r = await client.post("/v1/identifications", headers=h,
                              json=identification(work={"sector": "agriculture", "activity": "scrap_collection"}))
        assert r.status_code == 422 and "work" in r.json()["detail"] and "harvesting" in r.json()["detail"]
        r = await client.post("/v1/identifications", headers={**h, "content-type": "application/json"},
                              content=b"{not json")
        assert r.status_code in (400, 422)
        r = await client.get("/v1/cases/not-a-uuid", headers=h)
        assert r.status_code == 422 and "case_id" in r.json()["detail"]


async def test_database_down_is_a_503_with_a_sentence(env):
    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        state = client._transport.app.state  # type: ignore[attr-defined]
        real = state.deps
        away = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0)
        state.deps = dataclasses.replace(real, pool=away)
        try:
            r = await client.post("/v1/identifications", json=identification(), headers=police(env))
            assert r.status_code == 503 and "database is unavailable" in r.json()["detail"]
            r = await client.get(f"/v1/cases/{uuid.uuid4()}", headers=police(env))
            assert r.status_code == 503
        finally:
            await away.close()
            state.deps = real


async def test_erase_makes_the_personal_data_unreadable_and_keeps_the_facts(env):
    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        case_id = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()["case_id"]
        intake = client._transport.app.state.deps  # type: ignore[attr-defined]
        conn = await asyncpg.connect(env.database_url)
        try:
            ciphertext = await conn.fetchval("select pii_ciphertext from intake.cases where case_id = $1",
                                             uuid.UUID(case_id))
            actor = service.Actor(sub="operator", agency=AgencyType.coordinator, municipality="*", roles=("operator",),
                                  channel="cli")
            done = await service.erase_case(intake, case_id=uuid.UUID(case_id), actor=actor)
            assert not done.already
            assert await conn.fetchval("select count(*) from intake.case_keys") == 0
            # an old backup of the ciphertext is useless without the deleted data key
            assert ciphertext is not None
            view = (await client.get(f"/v1/cases/{case_id}", headers=police(env))).json()
            assert view["personal"] is None and view["child_ref"] is None and view["erased_at"]
            assert view["sector"] == "scrap_metal_waste"
            # the same child reported again no longer links to the erased case
            again = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()
            assert again["linked_case_id"] is None and again["repeat_identification"] is False
            with pytest.raises(service.CaseNotFound):
                await service.erase_case(intake, case_id=uuid.uuid4(), actor=actor)
        finally:
            await conn.close()


async def test_clms_erase_command_erases_one_case(env):
    import asyncio

    from typer.testing import CliRunner

    from services.intake.cli import app as intake_app

    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        keep = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()["case_id"]
        gone = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()["case_id"]
        runner = CliRunner()
        cli_env = {"DATABASE_URL": env.database_url, "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap_servers}
        result = await asyncio.to_thread(runner.invoke, intake_app, ["erase", gone, "--yes", "--operator", "ops.anna"],
                                         env=cli_env)
        assert result.exit_code == 0, result.output
        assert f"case {gone}: personal data erased" in result.output
        bad = await asyncio.to_thread(runner.invoke, intake_app, ["erase", "nope", "--yes"], env=cli_env)
        assert bad.exit_code == 2 and "not a case id" in bad.output
        missing = await asyncio.to_thread(runner.invoke, intake_app, ["erase", str(uuid.uuid4()), "--yes"], env=cli_env)
        assert missing.exit_code == 1 and "no case" in missing.output

        assert (await client.get(f"/v1/cases/{gone}", headers=police(env))).json()["personal"] is None
        assert (await client.get(f"/v1/cases/{keep}", headers=police(env))).json()["personal"]["given_name"] == "Arbër"
    rows = await audit_rows(env, uuid.UUID(gone))
    assert any(r["action"] == "case.erase" and r["actor"] == "ops.anna" and r["channel"] == "cli" for r in rows)


async def test_simultaneous_reports_of_one_child_all_link_to_the_first(env):
    import asyncio

    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        answers = await asyncio.gather(*(
            client.post("/v1/identifications", json=identification(), headers=police(env)) for _ in range(6)))
    bodies = [a.json() for a in answers]
    assert all(a.status_code == 201 for a in answers)
    first = [b for b in bodies if b["linked_case_id"] is None]
    assert len(first) == 1
    assert all(b["linked_case_id"] == first[0]["case_id"] for b in bodies if b is not first[0])


async def test_a_later_report_links_to_the_first_case_even_when_a_linked_case_has_an_earlier_timestamp(env):
    # created_at is a transaction's start time: a report that waited on the child's lock while the
    # first one committed carries an earlier created_at than the case it links to. The third report
    # must still link to the first case (the root of the chain), not to that second one.
    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        first = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()
        second = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()
        assert second["linked_case_id"] == first["case_id"]
        conn = await asyncpg.connect(env.database_url)
        try:
            await conn.execute("update intake.cases set created_at = created_at - interval '1 second' "
                               "where case_id = $1", uuid.UUID(second["case_id"]))
        finally:
            await conn.close()
        third = (await client.post("/v1/identifications", json=identification(), headers=police(env))).json()
        assert third["linked_case_id"] == first["case_id"]
        keyed = await client.post("/v1/identifications", json=identification(),
                                  headers={**police(env), "Idempotency-Key": str(uuid.uuid4())})
        assert keyed.json()["linked_case_id"] == first["case_id"]
