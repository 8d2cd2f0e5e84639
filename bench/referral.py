"""Benchmark: case events per second routed into committed referrals (inbox claim + referrals +
history + outbox rows in one transaction per event) by the referral service's faust worker,
next to the bare faust baseline (`../shared/baselines/faust_baseline.py`) on the same broker in
the same run. Prints both figures and the ratio (target >= 0.5).

    .venv/bin/python -m bench.referral            # embedded Tansu + PostgreSQL
    N=3000 BASELINE_N=10000 .venv/bin/python -m bench.referral
    KAFKA_BOOTSTRAP_SERVERS=... DATABASE_URL=... .venv/bin/python -m bench.referral

The referral figure counts from the first applied event to the N-th (so the worker's start and
group join are not in it), as the baseline does.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import asyncpg

from bench.baseline import faust_rate as baseline_rate
from services.referral.app import create_app
from shared.kafka import ensure_topics, make_producer
from shared.settings import Settings
from shared.topics import Topics
from tests import builders
from tests.apps import running

ROOT = Path(__file__).resolve().parents[1]


async def preload(settings: Settings, n: int) -> None:
    topics = Topics(settings.topic_prefix)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i in range(n):
            env = builders.envelope(builders.case_identified(
                municipality=["prizren", "prishtine", "ferizaj", "gjakove"][i % 4]))
            futures.append(await producer.send(topics.case_events, env.to_json_bytes(), key=env.key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def referral_rate(settings: Settings, n: int) -> float:
    await ensure_topics(settings)
    await preload(settings, n)
    app = create_app(settings)
    async with running(app):
        conn = await asyncpg.connect(settings.database_url)
        try:
            t0 = None
            deadline = time.perf_counter() + 600
            while time.perf_counter() < deadline:
                try:
                    done = await conn.fetchval("select count(*) from referral.inbox")
                except asyncpg.UndefinedTableError:
                    done = 0
                if done and t0 is None:
                    t0, first = time.perf_counter(), done
                if done >= n:
                    elapsed = time.perf_counter() - t0
                    opened = await conn.fetchval("select count(*) from referral.referral")
                    print(f"referral: {n} case events -> {opened} referrals", flush=True)
                    return (n - first) / elapsed if elapsed > 0 else float("inf")
                await asyncio.sleep(0.02)
            raise SystemExit(f"only {done} of {n} events applied in time")
        finally:
            await conn.close()


async def run(stack, *, n: int = 3000, baseline_n: int = 10000) -> dict:  # noqa: ANN001
    """The referral worker on `stack` (a bench.stack.Stack) for n preloaded case events, then the
    bare faust baseline for baseline_n events on the same broker."""
    settings = Settings(_env_file=None, KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap,
                        DATABASE_URL=await stack.new_database(),
                        CLMS_TOPIC_PREFIX=f"bench{uuid.uuid4().hex[:6]}.", CLMS_ENV="test",
                        KAFKA_FETCH_MAX_WAIT_MS=stack.fetch_wait_ms,
                        KAFKA_REBALANCE_TIMEOUT_S="2", LOG_JSON="false", LOG_LEVEL="WARNING",
                        REFERRAL_DEADLINE_POLL_S="1")
    ours = await referral_rate(settings, n)
    base = await asyncio.to_thread(baseline_rate, stack.bootstrap, baseline_n)
    return {"referral_events_per_s": ours, "baseline_events_per_s": base, "ratio": ours / base,
            "n": n, "baseline_n": baseline_n}


async def main() -> None:
    from bench.stack import start_stack

    stack = start_stack(durable_postgres=False)
    try:
        r = await run(stack, n=int(os.environ.get("N", "3000")), baseline_n=int(os.environ.get("BASELINE_N", "10000")))
        print(f"referral_events_per_s={r['referral_events_per_s']:.0f}")
        print(f"faust_baseline_events_per_s={r['baseline_events_per_s']:.0f}")
        print(f"ratio={r['ratio']:.2f} (target >= 0.5)")
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
