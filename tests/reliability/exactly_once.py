"""What every reliability test checks at the end: each accepted identification has exactly the
referrals the routing rules give it (none missing, none doubled), every duty officer exactly one
alert per referral, and analytics counts each case once."""

from __future__ import annotations

import uuid

import asyncpg
import httpx

from services.referral.rules import load_rules
from shared.events import CaseIdentified, parse_envelope
from shared.topics import Topics
from tests.e2e.harness import System
from tests.infra import wait_until
from tests.kafka_helpers import consumed_to_the_end, read_all


async def expected_referrals(system: System, case_ids: list[str]) -> dict[str, list[str]]:
    """The agencies each case must be referred to: the rules applied to its case.identified."""
    topics = Topics(system.settings.topic_prefix)
    identified: dict[str, CaseIdentified] = {}
    times = {}
    for rec in await read_all(system.settings, topics.case_events, min_count=len(case_ids), timeout_s=90):
        env = parse_envelope(rec.value)
        if env.type == "case.identified":
            identified[env.subject] = env.data
            times[env.subject] = env.time
    missing = set(case_ids) - set(identified)
    assert not missing, f"{len(missing)} accepted cases never reached clms.case-events"
    rules = load_rules()
    return {cid: sorted(d.agency.value for d in rules.route(identified[cid], at=times[cid])) for cid in case_ids}


async def assert_referred_and_alerted_exactly_once(system: System, case_ids: list[str]) -> dict[str, int]:
    expected = await expected_referrals(system, case_ids)
    want = sum(len(v) for v in expected.values())
    topics = Topics(system.settings.topic_prefix)
    conn = await asyncpg.connect(system.settings.database_url)
    try:
        async def referrals_complete():
            n = await conn.fetchval("select count(*) from referral.referral")
            return n if n >= want else None
        await wait_until(referrals_complete, timeout_s=150, what=f"{want} referrals", interval_s=0.5)
        # every delivery applied: a duplicate can no longer turn up after the count below
        await wait_until(lambda: consumed_to_the_end(system.settings, topics.case_events, "referral"), timeout_s=90,
                         what="referral to have applied every case event", interval_s=0.5)
        rows = await conn.fetch("select case_id::text as case_id, agency, referral_id, office_id from referral.referral")
        got: dict[str, list[str]] = {}
        for r in rows:
            got.setdefault(r["case_id"], []).append(r["agency"])
        for cid in case_ids:
            assert sorted(got.get(cid, [])) == expected[cid], f"case {cid}: {got.get(cid)} != {expected[cid]}"
        assert len(rows) == want, f"{len(rows)} referrals for {want} expected: some doubled"

        async def alerts_complete():
            n = await conn.fetchval(
                "select count(distinct referral_id) from notifications.alerts where event_type = 'referral.created'")
            return n if n >= len(rows) else None
        await wait_until(alerts_complete, timeout_s=150, what="an alert for every referral", interval_s=0.5)
        await wait_until(lambda: consumed_to_the_end(system.settings, topics.referral_events, "notifications"),
                         timeout_s=90, what="notifications to have applied every referral event", interval_s=0.5)
        per = await conn.fetch(
            "select referral_id, recipient, count(*) as n from notifications.alerts "
            "where event_type = 'referral.created' group by referral_id, recipient")
        doubled = [dict(r) for r in per if r["n"] != 1]
        assert not doubled, f"officers alerted more than once for a referral: {doubled[:5]}"
        recipients: dict[uuid.UUID, set[str]] = {}
        for r in per:
            recipients.setdefault(r["referral_id"], set()).add(r["recipient"])
        for r in rows:
            assert f"{r['office_id']}.duty" in recipients.get(r["referral_id"], set()), r["office_id"]
        emails = await conn.fetchval(
            "select count(*) from notifications.notifications where channel = 'email' "
            "and cause_event_type = 'referral.created'")
    finally:
        await conn.close()

    n = len(case_ids)
    async with httpx.AsyncClient(timeout=20) as client:
        everyone = system.headers(sub="coordinator.all", agency="coordinator", municipality="*",
                                  roles=["coordinator"])

        async def analytics_total():
            r = await client.get(f"{system.url('analytics')}/v1/counts/municipalities", headers=everyone)
            total = sum(m["identified"] for m in r.json()["municipalities"])
            return total if total >= n else None
        total = await wait_until(analytics_total, timeout_s=150, what=f"analytics to count {n}", interval_s=0.5)
        # and it stays there: once analytics has applied every delivery, nothing can be counted twice late
        await wait_until(lambda: consumed_to_the_end(system.settings, topics.case_events, "analytics"), timeout_s=90,
                         what="analytics to have applied every case event", interval_s=0.5)
        assert await analytics_total() == n
    return {"cases": n, "referrals": len(rows), "alerts": len(per), "emails": emails, "analytics": total}


async def all_ready(system: System) -> bool:
    async with httpx.AsyncClient(timeout=2) as client:
        for c in system.sup.children:
            if c.name == "mail-sink":
                continue
            try:
                if (await client.get(f"{c.url}/readyz")).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
    return True
