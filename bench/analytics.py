"""Benchmark: events per second folded into the analytics tables by the analytics faust worker,
and the time to rebuild every table, next to the bare faust baseline
(`../shared/baselines/faust_baseline.py`) on the same broker in the same run.

    .venv/bin/python -m bench.analytics                 # embedded Tansu
    FAST_ONLY=1 N=1000000 SHARES=2 .venv/bin/python -m bench.analytics  # rebuild in two shares
    N=20000 BASELINE_N=10000 .venv/bin/python -m bench.analytics
    KAFKA_BOOTSTRAP_SERVERS=... .venv/bin/python -m bench.analytics

What is timed:
- fold: a fresh deployment (new ANALYTICS_APP_ID) reads N preloaded events (per case:
  case.identified, referral.created, referral.acknowledged, notification.sent, on the three
  topics) from the beginning; events/s from the first applied event to the N-th, as the baseline
  counts. This is also the "rebuild from the topics" path; the 1,000,000-event rebuild time is
  extrapolated from it (1e6 / rate) unless N=1000000 is run.
- restart: the same deployment started again recovers its table from the changelog (no topic
  re-read); time from start to ready with identical counts.
- fast rebuild: `services.analytics.rebuild` (plain aiokafka fold + changelog write + offset
  commit) for another new app id, then the service's start and changelog recovery until it shows
  identical counts; 1M-event time extrapolated from that rate.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench.baseline import faust_rate as baseline_rate
from services.analytics.app import create_app
from services.analytics.rebuild import rebuild
from services.analytics.rules import Aggregate
from shared import events as ev
from shared.embedded import free_port
from shared.kafka import ensure_topics, make_producer
from shared.settings import Settings
from shared.topics import Topics
from tests import builders
from tests.apps import running

ROOT = Path(__file__).resolve().parents[1]
MUNIS = ["prizren", "prishtine", "ferizaj", "gjakove", "gjilan", "peje", "mitrovice", "decan"]


def case_events(i: int) -> list[tuple[str, ev.Envelope]]:
    muni = MUNIS[i % len(MUNIS)]
    ident = builders.case_identified(municipality=muni)
    cid, rid = ident.case_id, uuid.uuid4()
    t0 = datetime.now(timezone.utc)
    ref = dict(referral_id=rid, case_id=cid, municipality=muni, agency=ev.AgencyType.csw,
               office_id=f"csw.{muni}")
    wrap = lambda d, t=None: ev.Envelope.wrap(d, source="bench", subject=cid, time=t)  # noqa: E731
    return [
        ("case", wrap(ident, t0)),
        ("referral", wrap(ev.ReferralCreated(**ref, rule_id="csw-every-child", rule_version=1,
                                             priority="high", deadline=t0 + timedelta(hours=24),
                                             legal_basis="x", age_band=ident.age_band,
                                             sector=ident.sector, reported_by="police.x.duty"), t0)),
        ("referral", wrap(ev.ReferralAcknowledged(**ref, actor=f"csw.{muni}.duty",
                                                  from_status=ev.ReferralStatus.pending,
                                                  to_status=ev.ReferralStatus.acknowledged,
                                                  within_deadline=True), t0 + timedelta(seconds=60 + i % 3600))),
        ("notification", wrap(ev.NotificationSent(notification_id=uuid.uuid4(), referral_id=rid, case_id=cid,
                                                  recipient=f"csw.{muni}.duty", channel=ev.Channel.email,
                                                  cause_event_type="referral.created", attempt=1))),
    ]


async def preload(settings: Settings, n: int) -> int:
    topics = Topics(settings.topic_prefix)
    names = {"case": topics.case_events, "referral": topics.referral_events,
             "notification": topics.notification_events}
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    sent = 0
    try:
        futures = []
        i = 0
        while sent < n:
            for kind, e in case_events(i):
                if sent >= n:
                    break
                futures.append(await producer.send(names[kind], e.to_json_bytes(), key=e.key))
                sent += 1
            i += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def applied(app) -> int:
    total = 0
    for metric in app.state.deps.registry.collect():
        if metric.name == "analytics_events_applied":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)


async def fold_rate(settings: Settings, n: int) -> tuple[float, dict]:
    app = create_app(settings)
    async with running(app):
        t0, first = None, 0
        deadline = time.perf_counter() + 3600
        while time.perf_counter() < deadline:
            done = applied(app)
            if done and t0 is None:
                t0, first = time.perf_counter(), done
            if done >= n:
                elapsed = time.perf_counter() - t0
                return ((n - first) / elapsed if elapsed > 0 else float("inf")), await settled_counts(app)
            await asyncio.sleep(0.02)
        raise SystemExit(f"only {applied(app)} of {n} events folded in time")


async def settled_counts(app, timeout: float = 120.0) -> dict:  # noqa: ANN001
    """The API's counts once they hold every event folded: the API sums the partials the worker
    publishes (a moment after the fold), so the snapshot waits until both agree."""
    deps = app.state.deps
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        own = Aggregate()
        own.load_sum(deps.running.worker.partials.values())
        if deps.aggregate.counts == own.counts:
            return dict(deps.aggregate.counts)
        await asyncio.sleep(0.05)
    raise SystemExit(f"the API's counts did not reach the worker's own partials in {timeout:.0f}s")


async def restart_time(settings: Settings, expected: dict) -> float:
    t0 = time.perf_counter()
    app = create_app(settings)
    async with running(app) as client:
        while True:
            r = await client.get("/readyz")
            if r.status_code == 200 and dict(app.state.deps.aggregate.counts) == expected:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > 600:
                raise SystemExit("the restarted analytics worker did not show the same counts in 600 s")
            await asyncio.sleep(0.05)


async def fast_rebuild(settings: Settings, expected: dict | None) -> tuple[float, float, int]:
    """The rebuild tool for a new app id, then the service until it holds every case."""
    fast = settings.model_copy(update={"analytics_app_id": settings.analytics_app_id + "-fast"})
    t = time.perf_counter()
    result = await rebuild(fast)
    fold_s = time.perf_counter() - t
    if expected is not None:
        return fold_s, await restart_time(fast, expected), result.cases
    t = time.perf_counter()
    app = create_app(fast)
    async with running(app):
        while not ((worker := app.state.deps.running.worker) and worker.recovered
                   and len(worker.table) >= result.cases):
            await asyncio.sleep(0.05)
        return fold_s, time.perf_counter() - t, result.cases


def _settings(stack, **extra) -> Settings:  # noqa: ANN001
    return Settings(_env_file=None, KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap,
                    CLMS_TOPIC_PREFIX=f"bench{uuid.uuid4().hex[:6]}.", CLMS_ENV="test",
                    KAFKA_FETCH_MAX_WAIT_MS=stack.fetch_wait_ms,
                    KAFKA_REBALANCE_TIMEOUT_S="2", LOG_JSON="false", LOG_LEVEL="WARNING",
                    ANALYTICS_APP_ID=f"analytics-bench-{uuid.uuid4().hex[:6]}", **extra)


async def run(stack, *, n: int = 20000, baseline_n: int = 10000, log=print) -> dict:  # noqa: ANN001
    """The analytics faust worker folding n preloaded events (events/s), its restart from the
    changelog, the fast rebuild tool on the same events, then the bare faust baseline."""
    settings = _settings(stack)
    await ensure_topics(settings)
    t = time.perf_counter()
    n = await preload(settings, n)
    log(f"analytics: preloaded {n} events in {time.perf_counter() - t:.1f}s")
    ours, counts = await fold_rate(settings, n)
    log(f"analytics: {ours:.0f} events/s folded by the faust worker")
    restart = await restart_time(settings, counts)
    fold_s, start_s, _ = await fast_rebuild(settings, counts)
    base = await asyncio.to_thread(baseline_rate, stack.bootstrap, baseline_n)
    return {"analytics_events_per_s": ours, "baseline_events_per_s": base, "ratio": ours / base, "n": n,
            "baseline_n": baseline_n, "restart_from_changelog_s": restart, "fast_rebuild_fold_s": fold_s,
            "fast_rebuild_start_s": start_s}


async def run_rebuild(stack, *, n: int = 1_000_000, shares: int = 1, log=print) -> dict:  # noqa: ANN001
    """Preload n events, then `python -m services.analytics.rebuild` and `python -m
    services.analytics` (recovering the rebuilt table until /readyz) as separate processes, as an
    operator runs them; wall time and peak RSS of each. With `shares=2`, two rebuild processes
    (partitions 0-2 and 3-5) run side by side, then two workers of one group start side by side
    and each recovers its share: the figures are per share."""
    settings = _settings(stack)
    await ensure_topics(settings)
    t = time.perf_counter()
    n = await preload(settings, n)
    preload_s = time.perf_counter() - t
    log(f"rebuild: preloaded {n} events in {preload_s:.1f}s")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap, "CLMS_TOPIC_PREFIX": settings.topic_prefix,
           "CLMS_ENV": "test", "KAFKA_FETCH_MAX_WAIT_MS": stack.fetch_wait_ms, "LOG_LEVEL": "WARNING",
           "ANALYTICS_APP_ID": settings.analytics_app_id, "KAFKA_REBALANCE_TIMEOUT_S": "2"}
    split = [list(range(i, 6, shares)) for i in range(shares)] if shares > 1 else [None]
    folds = await asyncio.gather(*(asyncio.to_thread(_rebuild_process, env, parts) for parts in split))
    for fold_s, rss, last in folds:
        log(f"rebuild: fold {fold_s:.1f}s, peak RSS {rss:.0f} MB: {last}")
    starts = await asyncio.gather(*(_service_until_ready(env) for _ in split))
    for start_s, rss in starts:
        log(f"rebuild: service start + changelog recovery {start_s:.1f}s, peak RSS {rss:.0f} MB")
    fold_s, rebuild_rss = max(f[0] for f in folds), max(f[1] for f in folds)
    start_s, service_rss = max(s[0] for s in starts), max(s[1] or 0 for s in starts)
    return {"events": n, "shares": shares, "preload_s": preload_s, "fold_s": fold_s, "start_recover_s": start_s,
            "total_s": fold_s + start_s, "rebuild_peak_rss_mb": rebuild_rss, "service_peak_rss_mb": service_rss}


def _rebuild_process(env: dict, partitions: list[int] | None, *, root: Path = ROOT,
                     app_id: str | None = None) -> tuple[float, float, str]:
    """The rebuild tool as its own process: wall time, peak RSS (MB), its last line.

    Peak RSS is the child's own `VmHWM`, sampled until it exits: `ru_maxrss` from wait4 is not,
    because Linux carries the parent's resident set at fork into the child's figure (the bench
    holds the preloaded events: that is the 650-710 MB reported before)."""
    from bench.stack import peak_rss_mb

    args = ["--partitions", ",".join(map(str, partitions))] if partitions else []
    if app_id:
        args.insert(0, app_id)
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out_file:
        proc = subprocess.Popen([sys.executable, "-m", "services.analytics.rebuild", *args], cwd=root, env=env,
                                stdout=out_file, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.1)
        fold_s = time.perf_counter() - t
        out_file.seek(0)
        out = out_file.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"rebuild failed ({proc.returncode}):\n{out[-3000:]}")
    return fold_s, peak, out.strip().splitlines()[-1]


async def _service_until_ready(env: dict) -> tuple[float, float | None]:
    """`python -m services.analytics` until /readyz: seconds, then its peak RSS (MB)."""
    import httpx

    from bench.stack import peak_rss_mb

    port = free_port()
    t = time.perf_counter()
    svc = subprocess.Popen([sys.executable, "-m", "services.analytics"], cwd=ROOT,
                           env={**env, "ANALYTICS_PORT": str(port)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(timeout=2) as c:
            while True:
                if svc.poll() is not None:
                    raise SystemExit("the analytics service exited while recovering")
                try:
                    if (await c.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t > 1800:
                    raise SystemExit("analytics did not recover in 30 minutes")
                await asyncio.sleep(0.2)
        start_s = time.perf_counter() - t
        await asyncio.sleep(2)  # a moment of steady state after recovery
        return start_s, peak_rss_mb(svc.pid)
    finally:
        svc.terminate()
        try:
            svc.wait(20)
        except subprocess.TimeoutExpired:
            svc.kill()


async def main() -> None:
    from bench.stack import start_stack

    n = int(os.environ.get("N", "20000"))
    baseline_n = int(os.environ.get("BASELINE_N", "10000"))
    stack = start_stack()
    try:
        if os.environ.get("FAST_ONLY") == "1":  # only the fast rebuild, for large N
            r = await run_rebuild(stack, n=n, shares=int(os.environ.get("SHARES", "1")))
            print(f"fast_rebuild: fold {r['fold_s']:.1f}s + service start and recovery {r['start_recover_s']:.1f}s "
                  f"for N={r['events']} events -> 1M events in ~{r['total_s'] * 1e6 / r['events']:.0f}s "
                  "(linear extrapolation; target < 300)")
            return
        r = await run(stack, n=n, baseline_n=baseline_n)
        ours, base = r["analytics_events_per_s"], r["baseline_events_per_s"]
        fast_rate = r["n"] / (r["fast_rebuild_fold_s"] + r["fast_rebuild_start_s"])
        print(f"analytics_events_per_s={ours:.0f}")
        print(f"faust_baseline_events_per_s={base:.0f}")
        print(f"ratio={r['ratio']:.2f} (target >= 0.5)")
        print(f"rebuild_from_topics_1M_events_s={1_000_000 / ours:.0f} (extrapolated from N={n}; target < 300)")
        print(f"restart_from_changelog_s={r['restart_from_changelog_s']:.1f} (N={n} events)")
        print(f"fast_rebuild_s={r['fast_rebuild_fold_s']:.1f} + service start and changelog recovery "
              f"{r['fast_rebuild_start_s']:.1f}s = {fast_rate:.0f} events/s -> 1M events in "
              f"{1_000_000 / fast_rate:.0f}s (target < 300)")
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
