"""Benchmark: `referral.created` events per second applied by the notifications service's faust
worker in isolation (inbox claim, the referral row, one notification per recipient and channel,
the in-app alert with its outbox row, all committed), next to the bare faust baseline
(`../shared/baselines/faust_baseline.py`) on the same broker in the same run. Target: >= 1,000
events/s (issue 18).

    .venv/bin/python -m bench.notifications          # embedded broker + PostgreSQL
    N=5000 .venv/bin/python -m bench.notifications
    KAFKA_BOOTSTRAP_SERVERS=... DATABASE_URL=... .venv/bin/python -m bench.notifications

The events are what the referral service publishes for N/2 synthetic identifications (its
routing rules applied to each: the CSW office and, for school-age children, education), spread
over the municipalities of the development roster, so each one alerts the office's duty officer
in-app and by e-mail (and by SMS when its priority is high or urgent). The figure counts from the
first applied event to the N-th (the worker's start and group join are not in it), as the
baseline does. E-mail and SMS are delivered as `make run` delivers them: by the delivery process
(`python -m services.notifications.delivery`, the worker with NOTIFY_DELIVERY_IN_PROCESS=false),
against the development mail sink started as its own process (`python -m
services.notifications.sink`); `DELIVERY=inprocess` runs the delivery loop in the worker's process
instead (as before issue 18). The e-mails and SMS sent by the time the N-th event is applied are
printed beside the figure.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import asyncpg

from bench.referral import baseline_rate
from services.notifications.app import create_app
from services.referral.rules import load_rules
from shared.embedded import free_port
from shared.events import Envelope, ReferralCreated
from shared.kafka import ensure_topics, make_producer
from shared.settings import Settings
from shared.topics import Topics
from tests import builders
from tests.apps import running

MUNICIPALITIES = ["prizren", "prishtine", "ferizaj", "gjakove", "peje", "mitrovice"]
TARGET = 1000.0


def referral_events(n: int) -> list[Envelope]:
    """`referral.created` events as the referral service publishes them: its rules applied to
    synthetic identifications until there are n."""
    rules = load_rules()
    out: list[Envelope] = []
    i = 0
    while len(out) < n:
        case = builders.case_identified(municipality=MUNICIPALITIES[i % len(MUNICIPALITIES)])
        identified = builders.envelope(case)
        for d in rules.route(case, at=identified.time):
            if len(out) == n:
                break
            out.append(identified.follow(ReferralCreated(
                referral_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{identified.id}:{d.agency.value}"),
                case_id=case.case_id, municipality=case.municipality, agency=d.agency,
                office_id=d.office_id, rule_id=d.rule_id, rule_version=d.rule_version, priority=d.priority,
                deadline=d.deadline, legal_basis=d.legal_basis, age_band=case.age_band, sector=case.sector,
                reported_by=case.reported_by), source="referral"))
        i += 1
    return out


async def preload(settings: Settings, events: list[Envelope]) -> None:
    topics = Topics(settings.topic_prefix)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topics.referral_events, e.to_json_bytes(), key=e.key) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def start_process(settings: Settings, module: str) -> subprocess.Popen:
    """`python -m <module>` (the mail sink, the delivery process) with the bench's settings."""
    env = {**os.environ, "CLMS_SMTP_SINK_PORT": str(settings.smtp_sink_port),
           "CLMS_SMTP_SINK_HTTP_PORT": str(settings.smtp_sink_http_port),
           "WEBHOOK_SECRET": settings.webhook_secret.get_secret_value(), "LOG_LEVEL": "WARNING",
           "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "DATABASE_URL": settings.database_url or "", "CLMS_TOPIC_PREFIX": settings.topic_prefix,
           "CLMS_ENV": "test", "LOG_JSON": "false", "NOTIFICATIONS_DELIVERY_PORT": str(free_port()),
           "NOTIFICATIONS_DELIVERY_METRICS_PORT": "0"}
    return subprocess.Popen([sys.executable, "-m", module], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def notifications_rate(settings: Settings, n: int) -> dict:
    events = referral_events(n)
    await ensure_topics(settings)
    await preload(settings, events)
    children = [start_process(settings, "services.notifications.sink")]
    app = create_app(settings)
    try:
        async with running(app):
            if not settings.notify_delivery_in_process:  # after the worker migrated the schema
                children.append(start_process(settings, "services.notifications.delivery"))
            conn = await asyncpg.connect(settings.database_url)
            try:
                t0 = None
                deadline = time.perf_counter() + 900
                done = 0
                while time.perf_counter() < deadline:
                    try:
                        done = await conn.fetchval("select count(*) from notifications.inbox")
                    except asyncpg.UndefinedTableError:
                        done = 0
                    if done and t0 is None:
                        t0, first, cpu0 = time.perf_counter(), done, time.process_time()
                    if done >= n:
                        elapsed = time.perf_counter() - t0
                        # CPU of this process (the worker, and the delivery loop when in process):
                        # on a loaded machine a steadier figure than the rate
                        cpu_ms = (time.process_time() - cpu0) * 1000 / max(1, n - first)
                        counts = dict(await conn.fetch(
                            "select channel || ':' || status, count(*) from notifications.notifications "
                            "group by 1"))
                        alerts = await conn.fetchval("select count(*) from notifications.alerts")
                        print(f"notifications: {n} referral.created -> {alerts} inbox alerts; "
                              f"notifications by channel:status when the last event was applied: {counts}; "
                              f"worker process CPU {cpu_ms:.2f} ms per event", flush=True)
                        rate = (n - first) / elapsed if elapsed > 0 else float("inf")
                        return {"notifications_events_per_s": rate, "n": n, "alerts": alerts,
                                "notifications_by_channel_status": counts,
                                "worker_cpu_ms_per_event": cpu_ms}
                    await asyncio.sleep(0.02)
                raise SystemExit(f"only {done} of {n} events applied in time")
            finally:
                await conn.close()
    finally:
        for child in children:
            child.terminate()
            child.wait(10)


async def run(stack, *, n: int = 4000, baseline_n: int = 10000) -> dict:  # noqa: ANN001
    """The notifications worker on `stack` (a bench.stack.Stack) for n preloaded referral.created
    events, then the bare faust baseline for baseline_n events on the same broker."""
    settings = Settings(_env_file=None, KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap,
                        DATABASE_URL=await stack.new_database(),
                        CLMS_TOPIC_PREFIX=f"bench{uuid.uuid4().hex[:6]}.", CLMS_ENV="test",
                        KAFKA_FETCH_MAX_WAIT_MS=stack.fetch_wait_ms,
                        KAFKA_REBALANCE_TIMEOUT_S="2", LOG_JSON="false", LOG_LEVEL="WARNING",
                        CLMS_SMTP_SINK_PORT=str(free_port()), CLMS_SMTP_SINK_HTTP_PORT=str(free_port()),
                        REALERT_AFTER_S=str(timedelta(hours=1).total_seconds()),
                        NOTIFY_DELIVERY_IN_PROCESS=str(os.environ.get("DELIVERY") == "inprocess").lower())
    r = await notifications_rate(settings, n)
    base = await asyncio.to_thread(baseline_rate, stack.bootstrap, baseline_n) if baseline_n else None
    return {**r, "delivery": "inprocess" if settings.notify_delivery_in_process else "process",
            "baseline_events_per_s": base,
            "ratio": r["notifications_events_per_s"] / base if base else None, "baseline_n": baseline_n,
            "target_events_per_s": TARGET, "load_avg": os.getloadavg()}


async def main() -> None:
    from bench.stack import start_stack

    stack = start_stack(durable_postgres=False)
    try:
        load_before = os.getloadavg()
        r = await run(stack, n=int(os.environ.get("N", "4000")), baseline_n=int(os.environ.get("BASELINE_N", "10000")))
        print(f"notifications_events_per_s={r['notifications_events_per_s']:.0f} (target >= {TARGET:.0f})")
        if r["baseline_events_per_s"]:
            print(f"faust_baseline_events_per_s={r['baseline_events_per_s']:.0f}")
            print(f"ratio={r['ratio']:.2f}")
        print(f"load average before / after: {load_before[0]:.2f} / {r['load_avg'][0]:.2f} "
              f"on {os.cpu_count()} cores")
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
