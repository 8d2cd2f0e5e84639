"""500 identifications while the referral worker and then the notifications worker are stopped
three times each at random points and restarted: with SIGKILL (a crash) and with SIGTERM (a
graceful stop, as a rolling deploy does). Afterwards every case has exactly its referrals, every
officer exactly one alert per referral, analytics exactly 500: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter

import httpx
import pytest

from clms.demo import synthetic_identification
from tests.e2e.harness import running_system
from tests.reliability.exactly_once import assert_referred_and_alerted_exactly_once

pytestmark = pytest.mark.reliability

N = 500


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_nothing_lost_nothing_doubled_while_workers_are_stopped(tmp_path, how):
    sig = getattr(signal, how)
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
                await loop.run_in_executor(None, system.kill, service, sig)
                kills.append(f"{service}@{time.strftime('%H:%M:%S')}")
                await loop.run_in_executor(None, system.restart, service)

        t0 = time.monotonic()
        await asyncio.gather(post_all(), kill_workers())
        print(f"\n[reliability] {how}: posted {len(case_ids)} identifications in {time.monotonic() - t0:.1f}s; "
              f"kills: {kills}; retried answers: {dict(failures)}")
        assert len(case_ids) == N and len(set(case_ids)) == N

        figures = await assert_referred_and_alerted_exactly_once(system, case_ids)
        print(f"[reliability] {how}: {figures}")
