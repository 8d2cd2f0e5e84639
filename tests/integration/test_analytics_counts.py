"""Analytics on the real broker: events on the three topics (some delivered twice) give exactly
the expected counts and funnel per municipality, exact and live for the municipality's coordinator
(and a national coordinator); the public sees the published, disclosure-controlled snapshot
(rounded, small counts suppressed, no breakdowns of a small municipality, no referral figures);
errors name what was wrong.

The events are published and folded once for the module (the `counted` fixture); each test then
checks one behaviour against that running service. Only the redelivery test sends more, and what
it adds (one identification in Pejë) is read by no other test, so the tests pass in any order."""

from __future__ import annotations

import csv
import io
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest
from fastapi import FastAPI

from services.analytics.app import create_app
from shared import events as ev
from shared.settings import Settings
from shared.topics import Topics
from tests import builders
from tests.apps import bearer, running, scrape
from tests.infra import wait_until
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

T0 = datetime(2026, 2, 3, 9, 0, tzinfo=timezone.utc)


def _wrap(data, *, time=None, source="test/prizren"):
    return ev.Envelope.wrap(data, source=source, subject=data.case_id, time=time)


def _ref(case_id, rid, muni, agency=ev.AgencyType.csw):
    return dict(referral_id=rid, case_id=case_id, municipality=muni, agency=agency,
                office_id=f"{agency.value}.{muni}")


def _case_story(muni: str, *, month: int, ack_after_s: float | None, complete: bool,
                withdraw: bool, agency=ev.AgencyType.police, sector=ev.Sector.street_work):
    """(case-events, referral-events, notification-events) for one child."""
    ident = builders.case_identified(municipality=muni, identified_on=date(2026, month, 3),
                                     reporter_agency=agency, sector=sector)
    cid, rid = ident.case_id, uuid.uuid4()
    case = [_wrap(ident, time=T0)]
    refs = [_wrap(ev.ReferralCreated(**_ref(cid, rid, muni), rule_id="csw-every-child", rule_version=1,
                                     priority="high", deadline=T0 + timedelta(hours=24), legal_basis="x",
                                     age_band=ident.age_band, sector=ident.sector,
                                     reported_by="police.x.duty"), time=T0)]
    notes = [_wrap(ev.NotificationSent(notification_id=uuid.uuid4(), referral_id=rid, case_id=cid,
                                       recipient=f"csw.{muni}.duty", channel=ev.Channel.email,
                                       cause_event_type="referral.created", attempt=1), time=T0)]
    P, A, AC = ev.ReferralStatus.pending, ev.ReferralStatus.acknowledged, ev.ReferralStatus.accepted
    acted = dict(actor=f"csw.{muni}.duty")
    if ack_after_s is not None:
        refs.append(_wrap(ev.ReferralAcknowledged(**_ref(cid, rid, muni), **acted, from_status=P, to_status=A,
                                                  within_deadline=True), time=T0 + timedelta(seconds=ack_after_s)))
        refs.append(_wrap(ev.ReferralAccepted(**_ref(cid, rid, muni), **acted, from_status=A, to_status=AC)))
        if complete:
            refs.append(_wrap(ev.ReferralCompleted(**_ref(cid, rid, muni), **acted, from_status=AC,
                                                   to_status=ev.ReferralStatus.completed,
                                                   outcome=ev.ReferralOutcome.family_visited)))
    else:
        refs.append(_wrap(ev.ReferralOverdue(**_ref(cid, rid, muni), deadline=T0 + timedelta(hours=24), status=P)))
    if withdraw:
        case.append(_wrap(ev.CaseChildWithdrawn(case_id=cid, municipality=muni, on=date(2026, month, 20),
                                                confirmed_by_agency=ev.AgencyType.csw)))
    return case, refs, notes


async def _produce(env, topic, envelopes, *, twice=()):
    items = []
    for i, e in enumerate(envelopes):
        items.append((e.key, e.to_json_bytes()))
        if i in twice:
            items.append((e.key, e.to_json_bytes()))  # at-least-once: the same event again
    await produce(env, topic, items)


@dataclass(frozen=True)
class Counted:
    """The analytics service after it folded the module's events (see `counted`)."""

    env: Settings
    topics: Topics
    app: FastAPI
    client: httpx.AsyncClient
    case_events: list[ev.Envelope]
    coordinator: dict[str, str]  # of prizren
    national: dict[str, str]
    public_role: dict[str, str]


def _duplicates(app: FastAPI) -> float:
    return app.state.deps.registry.get_sample_value("analytics_events_duplicate_total") or 0.0


@pytest.fixture(scope="module")
async def counted(module_env):
    """Events on the three topics (every third delivered twice, and a poison message), the
    analytics service running, every event folded and a public snapshot published with them all."""
    env = module_env
    topics = Topics(env.topic_prefix)
    # prizren: 6 children in February (4 acknowledged, 3 of them completed; 2 overdue; 2 withdrawn)
    # gjilan: 2 children in March (1 acknowledged); decan: nothing.
    stories = (
        [_case_story("prizren", month=2, ack_after_s=600 * (i + 1), complete=i < 3, withdraw=i < 2,
                     agency=ev.AgencyType.police if i % 2 else ev.AgencyType.csw) for i in range(4)]
        + [_case_story("prizren", month=2, ack_after_s=None, complete=False, withdraw=False) for _ in range(2)]
        + [_case_story("gjilan", month=3, ack_after_s=60, complete=False, withdraw=False,
                       sector=ev.Sector.agriculture),
           _case_story("gjilan", month=3, ack_after_s=None, complete=False, withdraw=False,
                       sector=ev.Sector.agriculture)]
    )
    case_events = [e for s in stories for e in s[0]]
    referral_events = [e for s in stories for e in s[1]]
    notification_events = [e for s in stories for e in s[2]]
    # every third event is delivered twice
    case_twice, referral_twice = range(0, len(case_events), 3), range(0, len(referral_events), 3)
    await _produce(env, topics.case_events, case_events, twice=case_twice)
    await _produce(env, topics.referral_events, referral_events, twice=referral_twice)
    await _produce(env, topics.notification_events, notification_events, twice=(0,))
    # a poison message in the middle of a partition: dead-lettered, the partition keeps moving
    await produce(env, topics.case_events, [(case_events[0].key, b"{not json")])

    coordinator = bearer(env, sub="coordinator.prizren", agency="coordinator", municipality="prizren",
                         roles=["coordinator"])
    national = bearer(env, sub="coordinator.national", agency="coordinator", municipality="*",
                      roles=["coordinator"])
    public_role = bearer(env, sub="someone", agency="ngo", municipality="prizren", roles=["public"])
    # publish the public snapshot every second (daily in production)
    app = create_app(env.model_copy(update={"analytics_publish_every_s": 1.0, "analytics_publish_lag_s": 0.0}))
    async with running(app) as client:
        async def settled():
            r = await client.get("/v1/funnel", headers=national)
            stages = {s["stage"]: s["count"] for s in r.json()["stages"]}
            overdue = r.json()["referrals_by_agency"]["csw"]["overdue"]
            # every case referred and every overdue folded too: the three topics are read independently
            return stages if stages["identified"] == 8 and stages["referred"] == 8 and stages["completed"] == 3 and \
                stages["withdrawn"] == 2 and stages["accepted"] == 5 and overdue == 3 else None

        await wait_until(settled, timeout_s=45, what="all events folded into the funnel")
        await wait_until(lambda: app.state.deps.aggregate.counts.get(("nt", "email", "sent")) == 8,
                         timeout_s=10, what="notification events folded")
        # every first delivery twice is recognised too (so the redelivery test counts only its own)
        twice = len(case_twice) + len(referral_twice) + 1
        await wait_until(lambda: _duplicates(app) == twice, timeout_s=10,
                         what=f"the {twice} events delivered twice recognised")

        # every event is folded: a public snapshot captured from now on has them all
        settled_at = time.time()

        async def published():
            r = await client.get("/v1/counts/municipalities/prizren")
            as_of = r.json()["as_of"]
            return r.json() if datetime.fromisoformat(as_of).timestamp() >= settled_at else None
        await wait_until(published, timeout_s=10, what="a public snapshot with every event")

        yield Counted(env=env, topics=topics, app=app, client=client, case_events=case_events,
                      coordinator=coordinator, national=national, public_role=public_role)


async def test_coordinator_sees_exact_counts_of_own_municipality(counted):
    r = await counted.client.get("/v1/counts/municipalities/prizren", headers=counted.coordinator)
    assert r.status_code == 200
    d = r.json()
    assert d["identified"] == 6 and d["exact"] is True
    assert d["by_month"] == {"2026-02": 6}
    assert d["breakdowns"]["reporter_agency"]["police"] == 4  # 2 of the first 4, both overdue ones
    assert d["breakdowns"]["reporter_agency"]["csw"] == 2
    assert d["breakdowns"]["reporter_agency"]["education"] == 0
    assert d["breakdowns"]["sector"]["street_work"] == 6
    assert d["breakdowns"]["age_band"] == {"under_10": 0, "10_14": 6, "15_17": 0}
    assert d["breakdowns"]["hazardous"] == {"true": 6, "false": 0}
    assert d["funnel"] == {"identified": 6, "referred": 6, "acknowledged_in_time": 4, "accepted": 4,
                           "completed": 3, "withdrawn": 2, "school_enrolled": 0}
    assert d["referrals"]["csw"] == {"open": 3, "overdue": 2}


async def test_public_sees_rounded_snapshot_with_small_counts_suppressed(counted):
    """6 rounded to 5, 1..5 as "c", 0 as 0; prizren has fewer than 20 children, so no breakdowns;
    referral figures are never public."""
    for headers in ({}, counted.public_role):
        r = await counted.client.get("/v1/counts/municipalities/prizren", headers=headers)
        d = r.json()
        assert d["identified"] == 5 and d["exact"] is False and d["as_of"]
        assert d["funnel"]["referred"] == 5 and d["funnel"]["acknowledged_in_time"] == "c"
        assert d["funnel"]["school_enrolled"] == "c"  # hidden after a hidden stage (nested)
        assert d["breakdowns"] is None and d["by_month"] is None and d["breakdowns_offered"] is False
        assert d["referrals"] is None


async def test_coordinator_sees_another_municipality_as_published(counted):
    r = await counted.client.get("/v1/counts/municipalities/gjilan", headers=counted.coordinator)
    assert r.json()["identified"] == "c" and r.json()["exact"] is False


async def test_public_list_has_every_municipality_with_rates_hidden_when_counts_are(counted):
    """All 38 municipalities, zeros included; per 10,000 of the published figure, hidden when hidden."""
    r = await counted.client.get("/v1/counts/municipalities")
    body = r.json()
    assert body["disclosure"]["rounded_to"] == 5 and body["disclosure"]["breakdowns_from"] == 20
    rows = {m["slug"]: m for m in body["municipalities"]}
    assert len(rows) == 38
    assert rows["decan"]["identified"] == 0 and rows["decan"]["per_10000"] == 0
    assert rows["prizren"]["identified"] == 5 and rows["prizren"]["per_10000"] > 0
    assert rows["gjilan"]["identified"] == "c" and rows["gjilan"]["per_10000"] is None
    assert rows["prizren"]["open_referrals"] is None and rows["prizren"]["hazardous"] is None


async def test_month_ranges_need_a_coordinator_of_the_municipality(counted):
    """A month range, referral times: signed-in coordinators and analysts only."""
    r = await counted.client.get("/v1/counts/municipalities?from=2026-02&to=2026-02")
    assert r.status_code == 401 and "month range" in r.json()["detail"]
    r = await counted.client.get("/v1/counts/municipalities/gjilan?from=2026-02", headers=counted.coordinator)
    assert r.status_code == 403 and "gjilan" in r.json()["detail"]


async def test_national_coordinator_sees_exact_list(counted):
    r = await counted.client.get("/v1/counts/municipalities", headers=counted.national)
    rows = {m["slug"]: m for m in r.json()["municipalities"]}
    assert rows["gjilan"]["identified"] == 2 and rows["gjilan"]["overdue_referrals"] == 1


async def test_month_filter(counted):
    r = await counted.client.get("/v1/counts/municipalities?from=2026-03&to=2026-03", headers=counted.national)
    rows = {m["slug"]: m for m in r.json()["municipalities"]}
    assert rows["prizren"]["identified"] == 0 and rows["gjilan"]["identified"] == 2


async def test_funnel_of_one_municipality(counted):
    r = await counted.client.get("/v1/funnel?municipality=gjilan", headers=counted.national)
    assert [s["count"] for s in r.json()["stages"]] == [2, 2, 1, 1, 0, 0, 0]


async def test_csv_of_the_same_tables(counted):
    r = await counted.client.get("/v1/funnel?municipality=gjilan&format=csv", headers=counted.national)
    assert r.headers["content-type"].startswith("text/csv")
    got = list(csv.DictReader(io.StringIO(r.text)))
    assert {"municipality": "gjilan", "stage": "referred", "count": "2"} in got
    r = await counted.client.get("/v1/export/municipalities.csv")
    got = {row["slug"]: row for row in csv.DictReader(io.StringIO(r.text))}
    assert len(got) == 38 and got["prizren"]["identified"] == "5" and got["gjilan"]["identified"] == "c"
    r = await counted.client.get("/v1/counts/municipalities/prizren?format=csv", headers=counted.coordinator)
    assert "breakdown,sector,street_work,6" in r.text


async def test_time_to_acknowledge(counted):
    """4 csw acks in prizren at 600..2400 s (1 in gjilan at 60 s); signed-in users only."""
    r = await counted.client.get("/v1/time-to-acknowledge?municipality=prizren", headers=counted.coordinator)
    csw = next(a for a in r.json()["agencies"] if a["agency"] == "csw")
    assert csw["acknowledged"] == 4
    assert 1200 * 0.98 <= csw["median_seconds"] <= 1800 * 1.02
    assert 1800 * 0.98 <= csw["p90_seconds"] <= 2400 * 1.02
    r = await counted.client.get("/v1/time-to-acknowledge?municipality=prizren")
    assert r.status_code == 401


async def test_errors_name_what_was_wrong(counted):
    client = counted.client
    r = await client.get("/v1/counts/municipalities/atlantis")
    assert r.status_code == 404 and "atlantis" in r.json()["detail"]
    r = await client.get("/v1/counts/municipalities/prizren?from=2026-13")
    assert r.status_code == 422 and "from" in r.json()["detail"]
    r = await client.get("/v1/counts/municipalities?from=2026-05&to=2026-01")
    assert r.status_code == 422 and "to" in r.json()["detail"]
    r = await client.get("/v1/funnel?municipality=atlantis")
    assert r.status_code == 422 and "municipality" in r.json()["detail"]
    r = await client.get("/v1/counts/municipalities", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401


async def test_poison_message_is_dead_lettered_and_the_service_stays_ready(counted):
    r = await counted.client.get("/readyz")
    assert r.status_code == 200
    assert (await counted.client.get("/metrics")).status_code == 404  # monitoring port only
    text = await scrape(counted.app)
    assert 'analytics_dead_letters_total{reason="invalid_json"} 1.0' in text


async def test_redelivered_events_are_not_counted_again(counted):
    """A later redelivery of an old event does not count again; a new event does. The new one is
    in Pejë, which no other test reads (decan must stay 0 in the public list)."""
    app, client = counted.app, counted.client
    before = _duplicates(app)
    late_new = _case_story("peje", month=2, ack_after_s=None, complete=False, withdraw=False)[0][0]
    old = counted.case_events[:2]
    await _produce(counted.env, counted.topics.case_events, [*old, late_new])
    await wait_until(lambda: app.state.deps.aggregate.counts.get(("id", "peje", "2026-02", "total", "")) == 1,
                     timeout_s=20, what="the new peje identification")
    # both old events were read again and recognised (and not first folded as new, then skipped)
    await wait_until(lambda: _duplicates(app) >= before + 2, timeout_s=20, what="the two redeliveries recognised")
    r = await client.get("/v1/counts/municipalities/prizren", headers=counted.coordinator)
    assert r.json()["identified"] == 6
    text = await scrape(app)
    assert "analytics_events_duplicate_total" in text


async def test_a_partial_larger_than_a_broker_record_reaches_every_reader(env):
    """Years of counters at full breadth make a partition's partial larger than the broker's
    record limit: the worker's partials producer compresses it, the broker takes it and the API
    sums it (uncompressed the broker would refuse it and the counts would stop moving)."""
    from services.analytics.partials import BROKER_RECORD_LIMIT, partition_key

    big = builders.widest_partial(years=2)
    raw = big.to_bytes()
    assert len(raw) > BROKER_RECORD_LIMIT
    app = create_app(env)
    async with running(app):
        deps = app.state.deps
        await wait_until(lambda: deps.running.worker and deps.running.worker.recovered and deps.running.reader
                         and deps.running.reader.complete, timeout_s=45, what="the analytics worker and reader")
        worker = deps.running.worker
        await worker.producer.send_and_wait(worker.partials_topic, raw, key=partition_key(0))
        key = ("id", "prizren", "2027-12", "total", "")
        await wait_until(lambda: deps.aggregate.counts.get(key) == big.counts[key], timeout_s=30,
                         what="the API to sum the large partial")
