"""Benchmark: case events per second routed into committed referrals (inbox claim + referrals +
history + outbox rows in one transaction per event) by the referral service's faust worker,
next to the bare faust baseline (`../shared/baselines/faust_baseline.py`) on the same broker in
the same run. Prints both figures and the ratio (target >= 0.5).

    .venv/bin/python -m bench.referral            # embedded Tansu + PostgreSQL
    N=3000 BASELINE_N=10000 .venv/bin/python -m bench.referral
    KAFKA_BOOTSTRAP_SERVERS=... DATABASE_URL=... .venv/bin/python -m bench.referral

The referral figure counts from the first applied event to the N-th (so the worker's start and
group join are not in it), as the baseline does. Over the same window it measures the CPU the
process spends (`time.process_time`: the worker, its relay and this loop's polling; PostgreSQL
and the broker are not in it) per event: `referral_cpu_ms_per_event`.

Both waits print their progress every `PROGRESS_S` seconds. The referral wait gives up only when
nothing was applied for `STALL_S` seconds; the baseline is `bench.baseline.faust_rate` (its topics are made before it starts).

    PROFILE=/tmp/referral.svg .venv/bin/python -m bench.referral   # py-spy flame graph of the burst
    PROFILE=/tmp/referral.txt ...                                   # the same as collapsed stacks

py-spy is not a project dependency (`.venv/bin/pip install py-spy`); without it PROFILE is
ignored and the run measures as usual.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
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
PROGRESS_S = float(os.environ.get("PROGRESS_S", "15"))
STALL_S = float(os.environ.get("STALL_S", "180"))


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


async def _applied(conn: asyncpg.Connection) -> int:
    try:
        return await conn.fetchval("select count(*) from referral.inbox")
    except asyncpg.UndefinedTableError:
        return 0  # the migrations have not run yet


def _profiler(path: str | None) -> subprocess.Popen | None:
    """py-spy recording this process (the worker runs in it) until stopped; None without PROFILE."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not path or not spy:
        return None
    return subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--rate", "200", "--nonblocking", "--output", path,
                             "--format", {".json": "speedscope", ".txt": "raw"}.get(Path(path).suffix, "flamegraph")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def referral_rate(settings: Settings, n: int) -> dict:
    """Events/s and CPU ms per event of the referral worker on n preloaded case.identified."""
    await ensure_topics(settings)
    await preload(settings, n)
    app = create_app(settings)
    async with running(app):
        conn = await asyncpg.connect(settings.database_url)
        spy = None
        try:
            t0 = cpu0 = None
            first = last_done = 0
            started = last_change = last_print = time.perf_counter()
            while True:
                done = await _applied(conn)
                now = time.perf_counter()
                if done and t0 is None:
                    t0, cpu0, first = now, time.process_time(), done
                    spy = _profiler(os.environ.get("PROFILE"))
                if done >= n:
                    elapsed, cpu = now - t0, time.process_time() - cpu0
                    opened = await conn.fetchval("select count(*) from referral.referral")
                    print(f"referral: {n} case events -> {opened} referrals in {elapsed:.1f} s", flush=True)
                    return {"events_per_s": (n - first) / elapsed if elapsed > 0 else float("inf"),
                            "cpu_ms_per_event": 1000 * cpu / max(1, n - first)}
                if done != last_done:
                    last_done, last_change = done, now
                elif now - last_change > STALL_S:
                    raise SystemExit(f"referral: {done} of {n} events applied, none for {STALL_S:.0f} s "
                                     f"({now - started:.0f} s in); raise STALL_S if the machine is busy")
                if now - last_print >= PROGRESS_S:
                    print(f"referral: {done} of {n} applied after {now - started:.0f} s", flush=True)
                    last_print = now
                await asyncio.sleep(0.02)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
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
    return {"referral_events_per_s": ours["events_per_s"], "referral_cpu_ms_per_event": ours["cpu_ms_per_event"],
            "baseline_events_per_s": base, "ratio": ours["events_per_s"] / base,
            "n": n, "baseline_n": baseline_n}


async def main() -> None:
    from bench.stack import start_stack

    stack = start_stack(durable_postgres=False)
    try:
        r = await run(stack, n=int(os.environ.get("N", "3000")), baseline_n=int(os.environ.get("BASELINE_N", "10000")))
        print(f"referral_events_per_s={r['referral_events_per_s']:.0f}")
        print(f"referral_cpu_ms_per_event={r['referral_cpu_ms_per_event']:.2f}")
        print(f"faust_baseline_events_per_s={r['baseline_events_per_s']:.0f}")
        print(f"ratio={r['ratio']:.2f} (target >= 0.5)")
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
