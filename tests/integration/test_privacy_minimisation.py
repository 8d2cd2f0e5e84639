"""Issue 15 item 6, what was left: case.child_withdrawn, case.school_enrolled and case.closed no
longer publish `on`, the exact day the agency confirmed them (no consumer reads it). Intake keeps
the day in the case's own history; an upgraded database moves it there from the outbox, so a
`make run` replay does not publish it again. Real broker, real PostgreSQL."""

from __future__ import annotations

import shutil
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import orjson
import pytest

from services.intake.app import create_app
from shared import events as ev
from shared.db import migrate
from shared.topics import Topics
from tests.apps import bearer, running
from tests.integration.test_intake_api import identification, officer, police
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration

OUTCOMES = ("case.child_withdrawn", "case.school_enrolled", "case.closed")
INTAKE_MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "intake" / "migrations"


async def test_case_outcomes_are_published_without_the_day_and_intake_keeps_it(env):
    topics = Topics(env.topic_prefix)
    today = date.today()
    days = {"child_withdrawn": today - timedelta(days=8), "school_enrolled": today - timedelta(days=5),
            "closed": today - timedelta(days=2)}
    async with running(create_app(env, run_consumer=False)) as client:
        case_id = (await client.post("/v1/identifications", headers=police(env), json=identification(
            identified_on=(today - timedelta(days=20)).isoformat()))).json()["case_id"]
        supervisor = police(env, roles=("supervisor", "caseworker", "reporter"), sub="police.prizren.supervisor")
        coord = officer(env, "coordinator", "prizren", ("coordinator",))
        for kind, day in days.items():
            body = {"type": kind, "on": day.isoformat(), **({"reason": "resolved"} if kind == "closed" else {})}
            r = await client.post(f"/v1/cases/{case_id}/events", json=body,
                                  headers=coord if kind == "closed" else supervisor)
            assert r.status_code == 201, r.text

        records = await read_all(env, topics.case_events, min_count=4)
        outcomes = [r for r in records if ev.parse_envelope(r.value).type in OUTCOMES]
        assert [ev.parse_envelope(r.value).type for r in outcomes] == list(OUTCOMES)
        for r in outcomes:
            published = ev.parse_envelope(r.value).data
            assert published.on is None
            raw = r.value + b"".join(v or b"" for _, v in r.headers)
            for day in days.values():  # no copy of the day anywhere in the record
                assert day.isoformat().encode() not in raw, f"{published.event_type} still carries {day}"
        # the consumers' facts are all still there
        closed = ev.parse_envelope(outcomes[-1].value).data
        assert closed.reason is ev.CaseClosedReason.resolved and closed.confirmed_by_agency is ev.AgencyType.coordinator

        # intake keeps the day: the case's history shows it to whoever may read the case
        view = (await client.get(f"/v1/cases/{case_id}", headers=police(env))).json()
        shown = {h["type"]: h["on"] for h in view["history"]}
        assert shown == {"case.identified": None, **{f"case.{k}": d.isoformat() for k, d in days.items()}}


async def test_an_upgraded_database_moves_the_day_from_the_outbox_into_the_case_history(env, tmp_path):
    """A database migrated by the previous release (up to intake migration 020), with a case.closed
    in the outbox that still carries `on`: the upgrade copies the day to the case's history and
    takes it out of the outbox, leaving the rest of the event as it was."""
    old = tmp_path / "migrations"
    old.mkdir()
    for f in INTAKE_MIGRATIONS.glob("*.sql"):
        if int(f.name[:3]) <= 20:
            shutil.copy(f, old / f.name)
    case_id, event_id = uuid.uuid4(), uuid.uuid4()
    day = date(2026, 2, 14)
    published = ev.Envelope.wrap(
        ev.CaseClosed(case_id=case_id, municipality="prizren", on=day, confirmed_by_agency=ev.AgencyType.csw,
                      reason=ev.CaseClosedReason.resolved),
        source="csw/prizren", subject=case_id, id=event_id, time=datetime(2026, 2, 14, 9, tzinfo=timezone.utc))
    assert published.to_dict()["data"]["on"] == "2026-02-14"  # the previous release's form
    conn = await asyncpg.connect(env.database_url)
    try:
        await migrate(conn, schema="intake", folder=old)
        await conn.execute(
            """insert into intake.cases(case_id, municipality, status, identified_on, report_source, reporter_agency,
                   reporter_municipality, reported_by, channel, age_at_identification, age_band,
                   compulsory_school_age, sex, community, school_status, sector, activity, hazardous,
                   worst_form, employer_involved)
               values ($1, 'prizren', 'closed', '2026-02-01', 'officer', 'police', 'prizren', 'police.prizren.duty',
                   'http', 12, '10_14', true, 'male', 'roma', 'dropped_out', 'scrap_metal_waste',
                   'scrap_collection', true, false, false)""", case_id)
        await conn.execute("insert into intake.case_events(event_id, case_id, event_type, actor, agency) "
                           "values ($1, $2, 'case.closed', 'csw.prizren.supervisor', 'csw')", event_id, case_id)
        await conn.execute("insert into intake.outbox(event_id, topic, key, event_type, envelope, published_at) "
                           "values ($1, 'clms.case-events', $2, 'case.closed', $3::jsonb, now())",
                           event_id, str(case_id), published.to_json_bytes().decode())

        applied = await migrate(conn, schema="intake", folder=INTAKE_MIGRATIONS)
        assert "service:030" in applied

        assert await conn.fetchval("select confirmed_on from intake.case_events where event_id = $1", event_id) == day
        kept = orjson.loads(await conn.fetchval("select envelope from intake.outbox where event_id = $1", event_id))
        assert "on" not in kept["data"]
        expected = published.to_dict()
        del expected["data"]["on"]
        assert kept == expected
        assert ev.parse_envelope(kept).data.on is None  # replayed by `make run`: still a valid event
    finally:
        await conn.close()

    async with running(create_app(env, run_consumer=False, run_relay=False)) as client:
        view = (await client.get(f"/v1/cases/{case_id}", headers=bearer(
            env, sub="coordinator.prizren", agency="coordinator", municipality="prizren", roles=["coordinator"]))).json()
        assert [(h["type"], h["on"]) for h in view["history"]] == [("case.closed", "2026-02-14")]
