"""500 identifications while the referral worker and then the notifications worker are killed
with SIGKILL three times each at random points and restarted. Afterwards every case has exactly
its referrals, every officer exactly one alert per referral, analytics exactly 500: nothing lost,
nothing doubled."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter

import asyncpg
import httpx
import pytest

from clms.demo import synthetic_identification
from services.referral.rules import load_rules
from shared.events import CaseIdentified, parse_envelope
from shared.topics import Topics
from tests.e2e.harness import running_system
from tests.infra import wait_until
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.reliability

N = 500


async def test_nothing_lost_nothing_doubled_while_workers_are_killed(tmp_path):
    rng = random.Random(20261123)
    async with running_system(tmp_path / "sys") as system:
        intake = system.url("intake")
        case_ids: list[str] = []
        failures: Counter = Counter()
        kills: list[str] = []

        async def post_all() -> None:
            sem = asyncio.Semaphore(16)
            async with httpx.AsyncClient(timeout=30) as client:
                async def one(i: int) -> None:
                    agency, muni, body = synthetic_identification(rng)
                    headers = system.headers(sub=f"{agency}.{muni}.duty", agency=agency, municipality=muni,
                                             roles=["reporter"])
                    headers["Idempotency-Key"] = f"rel-{i}"
                    async with sem:
                        for _attempt in range(5):
                            r = await client.post(f"{intake}/v1/identifications", json=body, headers=headers)
                            if r.status_code == 201:
                                case_ids.append(r.json()["case_id"])
                                return
                            failures[r.status_code] += 1
                            await asyncio.sleep(0.5)
                        raise AssertionError(f"identification {i} kept failing: {r.status_code} {r.text}")
                    await asyncio.sleep(0)
                for start in range(0, N, 50):  # a steady stream, so kills land mid-flow
                    await asyncio.gather(*(one(i) for i in range(start, min(N, start + 50))))
                    await asyncio.sleep(0.3)

        async def kill_workers() -> None:
            loop = asyncio.get_running_loop()
            for service in ["referral"] * 3 + ["notifications"] * 3:
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                system.kill(service)
                kills.append(f"{service}@{time.strftime('%H:%M:%S')}")
                await loop.run_in_executor(None, system.restart, service)

        t0 = time.monotonic()
        await asyncio.gather(post_all(), kill_workers())
        print(f"\n[reliability] posted {len(case_ids)} identifications in {time.monotonic() - t0:.1f}s; "
              f"kills: {kills}; retried answers: {dict(failures)}")
        assert len(case_ids) == N and len(set(case_ids)) == N

        # what each case must have: the routing rules applied to its published case.identified
        topics = Topics(system.settings.topic_prefix)
        identified: dict[str, CaseIdentified] = {}
        times = {}
        for rec in await read_all(system.settings, topics.case_events, min_count=N, timeout_s=60):
            env = parse_envelope(rec.value)
            if env.type == "case.identified":
                identified[env.subject] = env.data
                times[env.subject] = env.time
        assert set(case_ids) <= set(identified)
        rules = load_rules()
        expected = {cid: {d.agency.value for d in rules.route(identified[cid], at=times[cid])} for cid in case_ids}
        want_referrals = sum(len(v) for v in expected.values())

        conn = await asyncpg.connect(system.settings.database_url)
        try:
            async def referrals_complete():
                n = await conn.fetchval("select count(*) from referral.referral")
                return n if n >= want_referrals else None
            await wait_until(referrals_complete, timeout_s=120, what=f"{want_referrals} referrals", interval_s=0.5)
            rows = await conn.fetch("select case_id::text as case_id, agency, referral_id, office_id from referral.referral")
            got: dict[str, list[str]] = {}
            for r in rows:
                got.setdefault(r["case_id"], []).append(r["agency"])
            for cid in case_ids:
                assert sorted(got.get(cid, [])) == sorted(expected[cid]), f"case {cid}: {got.get(cid)} != {expected[cid]}"
            assert len(rows) == want_referrals

            async def alerts_complete():
                n = await conn.fetchval(
                    "select count(distinct referral_id) from notifications.alerts where event_type = 'referral.created'")
                return n if n >= len(rows) else None
            await wait_until(alerts_complete, timeout_s=120, what="an alert for every referral", interval_s=0.5)
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
                "select count(*) from notifications.notifications where channel = 'email' and cause_event_type = 'referral.created'")
        finally:
            await conn.close()

        async with httpx.AsyncClient(timeout=20) as client:
            everyone = system.headers(sub="coordinator.all", agency="coordinator", municipality="*",
                                      roles=["coordinator"])

            async def analytics_total():
                r = await client.get(f"{system.url('analytics')}/v1/counts/municipalities", headers=everyone)
                total = sum(m["identified"] for m in r.json()["municipalities"])
                return total if total >= N else None
            total = await wait_until(analytics_total, timeout_s=120, what="analytics to count 500", interval_s=0.5)
            await asyncio.sleep(2)  # and it stays there (nothing counted twice late)
            assert await analytics_total() == N
        print(f"[reliability] {N} cases -> {len(rows)} referrals, {len(per)} referral alerts (one each), "
              f"{emails} e-mail notifications, analytics identified={total}")
