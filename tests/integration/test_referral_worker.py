"""The referral worker on the real broker and Postgres: case events in, referrals and
referral.created events out, exactly once per (case, agency), poison dead-lettered."""

from __future__ import annotations

from datetime import datetime, timezone

import asyncpg
import pytest

from services.referral.app import create_app
from shared.events import AgencyType, ReportSource, Sector, parse_envelope
from shared.kafka import DeadLetter
from shared.topics import Topics
from tests import builders
from tests.apps import scrape, running
from tests.infra import wait_until
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


async def db_rows(env, sql: str, *args):
    conn = await asyncpg.connect(env.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def referral_events(records, event_type: str | None = None):
    envs = [parse_envelope(r.value) for r in records]
    return [e for e in envs if event_type is None or e.type == event_type]


async def test_case_events_open_one_referral_per_agency_once_and_poison_is_dead_lettered(env):
    """Two cases, one event delivered twice (and once more later), a bad message and a wrong
    event type between them: every agency gets one referral, the bad ones are dead-lettered and
    the partition keeps moving."""
    topics = Topics(env.topic_prefix)
    scrap = builders.envelope(builders.case_identified(reported_by="police.prizren.duty"))
    trafficking = builders.envelope(builders.case_identified(
        municipality="gjakove", sector=ev_sector("trafficking"), worst_form=True,
        report_source=ReportSource.citizen, reporter_agency=AgencyType.ngo, reported_by="ngo.gjakove.duty"),
        source="ngo/gjakove")
    update = builders.envelope(builders.one_of_each()[1].model_copy(update={"case_id": scrap.data.case_id}))
    # a valid envelope that does not belong on case-events: the handler refuses it
    wrong_topic = builders.envelope(builders.one_of_each()[5].model_copy(update={"case_id": scrap.data.case_id}))
    # a valid envelope whose deadlines cannot be computed (year 9999): a handler error inside a
    # batch, so the batch is applied again one by one and only this event is dead-lettered
    far_future = builders.envelope(builders.case_identified(case_id=scrap.data.case_id),
                                   time=datetime(9999, 12, 31, 23, 0, tzinfo=timezone.utc))
    same_key = scrap.key
    await produce(env, topics.case_events, [
        (same_key, scrap.to_json_bytes()),
        (same_key, scrap.to_json_bytes()),          # redelivered
        (same_key, b"{not json"),                   # poison
        (same_key, wrong_topic.to_json_bytes()),     # handler error
        (same_key, far_future.to_json_bytes()),      # handler error inside a batch
        (same_key, update.to_json_bytes()),         # other case.* types: applied, no referral
        (trafficking.key, trafficking.to_json_bytes()),
    ])

    app = create_app(env)
    async with running(app) as client:
        records = await read_all(env, topics.referral_events, min_count=6, timeout_s=40)
        # the same event once more, after it has been applied: nothing new
        await produce(env, topics.case_events, [(same_key, scrap.to_json_bytes())])
        after = builders.envelope(builders.case_identified(municipality="prizren"))
        await produce(env, topics.case_events, [(same_key, after.to_json_bytes())])
        await wait_until(lambda: _count(env, after.data.case_id), timeout_s=20,
                         what="the event after the redelivery to be routed")
        metrics = await scrape(app)
        ready = await client.get("/readyz")

    created = referral_events(records, "referral.created")
    by_case: dict[str, dict[str, object]] = {}
    for e in created:
        by_case.setdefault(e.subject, {})[e.data.agency.value] = e
    assert set(by_case[str(scrap.data.case_id)]) == {"csw", "education"}
    assert set(by_case[str(trafficking.data.case_id)]) == {"csw", "education", "police", "prosecution"}
    assert len(created) == 6, "a redelivered event opens nothing twice"

    csw = by_case[str(scrap.data.case_id)]["csw"]
    assert csw.data.office_id == "csw.prizren" and csw.data.municipality == "prizren"
    assert csw.data.reported_by == "police.prizren.duty"
    assert csw.data.age_band == scrap.data.age_band and csw.data.sector is Sector.scrap_metal_waste
    assert csw.data.rule_id == "csw-every-child" and csw.data.rule_version == 1
    assert (csw.data.deadline - scrap.time).total_seconds() == 24 * 3600
    assert csw.correlationid == scrap.correlationid and csw.causationid == str(scrap.id)
    assert csw.source == "referral"
    police = by_case[str(trafficking.data.case_id)]["police"]
    assert police.data.priority == "urgent" and police.data.office_id == "police.gjakove"
    assert (police.data.deadline - trafficking.time).total_seconds() == 2 * 3600

    rows = await db_rows(env, "select case_id, agency, office_id, status, rule_id, rule_version, deadline "
                              "from referral.referral")
    assert len(rows) == 6 + 2
    assert all(r["status"] == "pending" for r in rows)
    assert {(str(r["case_id"]), r["agency"]) for r in rows} >= {
        (str(scrap.data.case_id), "csw"), (str(scrap.data.case_id), "education")}
    inbox = await db_rows(env, "select event_id, event_type from referral.inbox")
    assert {r["event_type"] for r in inbox} == {"case.identified", "case.updated"}
    assert len(inbox) == 4, "the dead-lettered events are not recorded as applied"
    history = await db_rows(env, "select action, actor from referral.referral_history")
    assert len(history) == 8 and {h["action"] for h in history} == {"created"}

    dlq = await read_all(env, topics.dead_letters, min_count=3)
    letters = [DeadLetter.from_headers(r.headers, key=r.key, value=r.value) for r in dlq]
    assert [(lt.reason, lt.offset, lt.topic) for lt in letters] == [
        ("invalid_json", 2, topics.case_events), ("handler_error", 3, topics.case_events),
        ("handler_error", 4, topics.case_events)]
    assert "referral.created does not belong on case-events" in letters[1].error
    assert "OverflowError" in letters[2].error
    assert lt_group(letters) == env.group_id("referral")

    assert 'clms_referrals_opened_total{agency="csw",priority="high"}' in metrics
    assert 'clms_referral_dead_letters_total{reason="invalid_json"} 1.0' in metrics
    assert ready.status_code == 200, ready.text


def lt_group(letters):
    return letters[0].group


def ev_sector(name: str) -> Sector:
    return Sector(name)


async def _count(env, case_id) -> int:
    rows = await db_rows(env, "select count(*) as n from referral.referral where case_id = $1", case_id)
    return rows[0]["n"]
