"""Deadlines on the real broker and Postgres: a referral still unanswered at its deadline is
marked overdue and escalated to the municipal coordinator exactly once, also when the deadline
passes while the service is down and when the service restarts afterwards.

The clock is injected (`create_app(settings, clock=...)`): the test moves it four days ahead
instead of waiting, and learns from it when the deadline scanner has run (`Clock.scanned`)
instead of sleeping."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from services.referral.app import create_app
from shared.events import ReportSource
from shared.topics import Topics
from tests import builders
from tests.apps import scrape, bearer, running
from tests.infra import wait_until
from tests.integration.test_referral_worker import db_rows, referral_events
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


SCANNER_TASK = "referral-deadlines"  # the name services/referral/app.py gives the scanner's task


class Clock:
    """The referral service's clock, moved by the test (`offset`). It also notes the times it gave
    the deadline scanner (the asyncio task `referral-deadlines`), which is how a test knows that
    a scan ran, and with which time, without sleeping."""

    def __init__(self) -> None:
        self.offset = timedelta()
        self.scans: list[datetime] = []

    def __call__(self) -> datetime:
        now = datetime.now(timezone.utc) + self.offset
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop running
            task = None
        if task is not None and task.get_name() == SCANNER_TASK:
            self.scans.append(now)
        return now

    async def scanned(self, *, timeout_s: float = 20) -> None:
        """Wait until a whole deadline scan ran with the clock as it reads now (or later). The
        scanner reads the clock when a scan starts and scans one round after the other, so once
        it has read the time twice since now, the first of those scans has finished and its
        transaction is committed."""
        since = self()
        what = f"the deadline scanner (task {SCANNER_TASK!r}) to finish a scan at {since:%Y-%m-%d %H:%M}"
        await wait_until(lambda: sum(t >= since for t in self.scans) >= 2, timeout_s=timeout_s, what=what)


async def test_an_overdue_referral_is_escalated_once_across_restarts(env):
    env = env.model_copy(update={"referral_deadline_poll_s": 0.05})
    topics = Topics(env.topic_prefix)
    clock = Clock()
    # a citizen report in Prizren: csw (24 h), education (72 h), police (24 h)
    case = builders.case_identified(report_source=ReportSource.citizen)
    await produce(env, topics.case_events, [(str(case.case_id).encode(), builders.envelope(case).to_json_bytes())])
    coordinator = bearer(env, sub="coordinator.prizren", agency="coordinator", municipality="prizren",
                         roles=["coordinator"])

    async def ids() -> dict[str, str]:
        rows = await db_rows(env, "select agency, referral_id from referral.referral")
        return {r["agency"]: str(r["referral_id"]) for r in rows}

    # 1. the service opens the referrals; CSW acknowledges, Education accepts; nothing is due yet
    async with running(create_app(env, clock=clock)) as client:
        await wait_until(lambda: _has(ids, 3), timeout_s=30, what="three referrals")
        refs = await ids()
        assert set(refs) == {"csw", "education", "police"}
        for path in (f"{refs['csw']}/acknowledge", f"{refs['education']}/acknowledge", f"{refs['education']}/accept"):
            r = await client.post(f"/v1/referrals/{path}", headers=coordinator)
            assert r.status_code == 200, r.text
        await clock.scanned()
        assert not await db_rows(env, "select 1 from referral.referral where overdue")

    # 2. the deadlines pass while the service is down
    clock.offset = timedelta(days=4)

    # 3. it starts again: the unanswered ones (pending police, acknowledged-only CSW) escalate
    app = create_app(env, clock=clock)
    async with running(app) as client:
        await wait_until(lambda: _escalated(env, 2), timeout_s=20, what="two escalated referrals")
        await clock.scanned()  # a scan after the escalations: nothing more is due
        overdue = (await client.get("/v1/referrals", params={"overdue": "true"}, headers=coordinator)).json()
        assert {i["agency"] for i in overdue["items"]} == {"csw", "police"}
        for item in overdue["items"]:
            assert item["escalated_to"] == "coordinator.prizren" and item["escalation_reason"] == "overdue"
        not_overdue = (await client.get("/v1/referrals", params={"overdue": "false"}, headers=coordinator)).json()
        assert [i["agency"] for i in not_overdue["items"]] == ["education"]
        metrics = await scrape(app)
        assert 'clms_referrals_overdue_total{agency="police"} 1.0' in metrics
        assert 'clms_referrals_overdue_total{agency="csw"} 1.0' in metrics

    # 4. and once more: nothing is escalated twice; answering late is recorded as late
    async with running(create_app(env, clock=clock)) as client:
        await clock.scanned()  # the restarted scanner ran past the deadlines again
        r = await client.post(f"/v1/referrals/{refs['police']}/acknowledge", headers=coordinator)
        assert r.status_code == 200
        records = await read_all(env, topics.referral_events, min_count=3 + 3 + 4 + 1, timeout_s=20)

    events = referral_events(records)
    overdue_events = [e for e in events if e.type == "referral.overdue"]
    escalated = [e for e in events if e.type == "referral.escalated"]
    assert sorted(e.data.agency.value for e in overdue_events) == ["csw", "police"]
    assert sorted(e.data.agency.value for e in escalated) == ["csw", "police"]
    assert {e.data.status.value for e in overdue_events} == {"pending", "acknowledged"}
    assert all(e.data.reason == "overdue" and e.data.escalated_to == "coordinator.prizren" for e in escalated)
    assert all(e.correlationid == events[0].correlationid for e in events)
    late_ack = [e for e in events if e.type == "referral.acknowledged" and e.data.agency.value == "police"]
    assert len(late_ack) == 1 and late_ack[0].data.within_deadline is False
    history = await db_rows(env, "select action, count(*) as n from referral.referral_history "
                                 "where action in ('overdue', 'escalate') group by action")
    assert {h["action"]: h["n"] for h in history} == {"overdue": 2, "escalate": 2}


async def _has(ids, n: int) -> bool:
    return len(await ids()) >= n


async def _escalated(env, n: int) -> bool:
    rows = await db_rows(env, "select count(*) as n from referral.referral where overdue and escalated")
    return rows[0]["n"] >= n

