"""PostgreSQL stopped for 10 seconds under load and started again: the services recover by
themselves and no accepted identification is lost; a request that failed said so with a 503."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import asyncpg
import httpx
import pytest

from clms.demo import synthetic_identification
from tests.e2e.harness import running_system
from tests.infra import wait_until

pytestmark = pytest.mark.reliability

OUTAGE_S = 10


async def test_services_ride_out_a_database_outage_without_losing_accepted_cases(tmp_path):
    rng = random.Random(7)
    async with running_system(tmp_path / "sys") as system:
        accepted: list[tuple[str, dict]] = []
        statuses: Counter = Counter()
        stop = asyncio.Event()

        async def load() -> None:
            async with httpx.AsyncClient(timeout=15) as client:
                i = 0
                while not stop.is_set():
                    agency, muni, body = synthetic_identification(rng)
                    headers = system.headers(sub=f"{agency}.{muni}.duty", agency=agency, municipality=muni,
                                             roles=["reporter"])
                    i += 1
                    try:
                        r = await client.post(f"{system.url('intake')}/v1/identifications", json=body,
                                              headers={**headers, "Idempotency-Key": f"pg-{i}"})
                    except httpx.HTTPError as exc:
                        statuses[type(exc).__name__] += 1
                        continue
                    statuses[r.status_code] += 1
                    if r.status_code == 201:
                        accepted.append((r.json()["case_id"], headers))
                    else:
                        assert r.status_code == 503, f"{r.status_code}: {r.text}"
                        assert r.json().get("detail"), "a 503 says what happened"
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(load())
        await asyncio.sleep(3)
        before_outage = len(accepted)
        pg = system.sup.postgres
        assert pg is not None
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        await loop.run_in_executor(None, pg.stop)
        await asyncio.sleep(2)
        async with httpx.AsyncClient(timeout=10) as client:
            for service in ("intake", "referral", "notifications"):
                r = await client.get(f"{system.url(service)}/readyz")
                assert r.status_code == 503, f"{service} /readyz must fail while PostgreSQL is down: {r.text}"
                assert "database" in r.json()["checks"], r.text
                assert (await client.get(f"{system.url(service)}/healthz")).status_code == 200
        await asyncio.sleep(OUTAGE_S - 2)
        during = dict(statuses)
        await loop.run_in_executor(None, pg.start)
        print(f"\n[reliability] PostgreSQL down for {time.monotonic() - t0:.1f}s; answers so far {during}")
        await asyncio.sleep(8)  # load continues after the restart
        stop.set()
        await task
        assert statuses[503] > 0, f"requests during the outage must fail with 503, got {dict(statuses)}"
        assert len(accepted) > before_outage + 5, "intake accepts identifications again after the outage"
        assert not [k for k in statuses if k not in (201, 503)], dict(statuses)

        async with httpx.AsyncClient(timeout=10) as client:
            for service in ("intake", "referral", "notifications", "analytics"):
                async def ready(service: str = service):
                    try:
                        return (await client.get(f"{system.url(service)}/readyz")).status_code == 200
                    except httpx.HTTPError:
                        return False
                await wait_until(ready, timeout_s=60, what=f"{service} to be ready again by itself")
            for case_id, headers in accepted:
                r = await client.get(f"{system.url('intake')}/v1/cases/{case_id}", headers=headers)
                assert r.status_code == 200, f"accepted case {case_id} lost: {r.status_code}"

        want = {cid for cid, _ in accepted}
        conn = await asyncpg.connect(system.settings.database_url)
        try:
            async def all_referred():
                rows = await conn.fetch("select distinct case_id::text from referral.referral")
                return want <= {r[0] for r in rows}
            await wait_until(all_referred, timeout_s=90, what="every accepted case to be referred", interval_s=0.5)
        finally:
            await conn.close()
        print(f"[reliability] answers {dict(statuses)}; all {len(accepted)} accepted cases stored and referred")
