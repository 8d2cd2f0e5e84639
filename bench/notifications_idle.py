"""Benchmark: the CPU the notifications processes burn when nothing happens (issue 18: the whole
stack < 0.05 core idle, no polling loops).

    .venv/bin/python -m bench.notifications_idle          # embedded broker + PostgreSQL
    IDLE_S=60 .venv/bin/python -m bench.notifications_idle

Starts the API/worker process (`python -m services.notifications`, NOTIFY_DELIVERY_IN_PROCESS=false
as `clms dev` runs it), the delivery process (`python -m services.notifications.delivery`) and the
development mail sink, each as its own OS process with the default settings, on free ports. A few
referrals go through first (so the delivery and re-alert loops have rows to look at, as in real
life: sent e-mails, referrals waiting for their re-alert), then, after a short settle, the CPU
time (utime + stime from /proc) of each process and of the PostgreSQL backends serving this run's
database, and the transactions on that database (pg_stat_database), are read over IDLE_S
seconds (30) with no traffic at all.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import asyncpg

from bench.intake import cpu_seconds, wait_ready
from bench.notifications import preload, referral_events
from bench.stack import start_stack
from shared.embedded import free_port
from shared.kafka import ensure_topics
from shared.settings import Settings


def _pid_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _transactions(url: str, database: str) -> int:
    """Transactions on the database so far (pg_stat_database: each backend reports its own
    about once a second while busy, within 10 s when idle; over 30 s, a fair count)."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("select xact_commit + xact_rollback from pg_stat_database "
                                   "where datname = $1", database)
    finally:
        await conn.close()


async def idle_cpu(settings: Settings, env: dict[str, str], *, idle_s: float, events: int) -> dict[str, float]:
    def start(module: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", module], env={**env, **extra},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    api_port, delivery_port = free_port(), free_port()
    procs = {"mail sink": start("services.notifications.sink")}
    try:
        procs["notifications (API/worker)"] = start("services.notifications", NOTIFICATIONS_PORT=str(api_port))
        await wait_ready(api_port, timeout_s=120)
        procs["notifications delivery"] = start("services.notifications.delivery",
                                                NOTIFICATIONS_DELIVERY_PORT=str(delivery_port))
        await wait_ready(delivery_port, timeout_s=120)
        await preload(settings, referral_events(events))
        conn = await asyncpg.connect(settings.database_url)
        try:
            deadline = time.monotonic() + 120
            while await conn.fetchval("select count(*) from notifications.notifications "
                                      "where status = 'pending'") or \
                    await conn.fetchval("select count(*) from notifications.inbox") < events:
                if time.monotonic() > deadline:
                    raise SystemExit("the warm-up referrals were not delivered in time")
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
        # settle: the last round trips, and their statistics (an idle backend reports within 10 s)
        await asyncio.sleep(12)
        database = settings.database_url.rsplit("/", 1)[1]
        pids = {name: p.pid for name, p in procs.items()}
        cpu0 = {name: _pid_cpu(pid) for name, pid in pids.items()}
        pg0 = cpu_seconds(lambda cmd: cmd.startswith("postgres:") and f" {database} " in cmd)
        tx0 = await _transactions(settings.database_url, database)
        await asyncio.sleep(idle_s)
        tx = await _transactions(settings.database_url, database) - tx0 - 1  # less the reading's own
        out = {name: round((_pid_cpu(pid) - cpu0[name]) / idle_s, 4) for name, pid in pids.items()}
        out["postgres backends of this database"] = round(
            (cpu_seconds(lambda cmd: cmd.startswith("postgres:") and f" {database} " in cmd) - pg0) / idle_s, 4)
        out["transactions per second on this database"] = round(tx / idle_s, 2)
        return out
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


async def main() -> None:
    stack = start_stack(durable_postgres=False)
    try:
        idle_s = float(os.environ.get("IDLE_S", "30"))
        ours = {"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap,
               "DATABASE_URL": await stack.new_database(), "CLMS_TOPIC_PREFIX": f"idle{uuid.uuid4().hex[:6]}.",
               "CLMS_ENV": "test", "LOG_JSON": "false", "LOG_LEVEL": "WARNING",
               "KAFKA_FETCH_MAX_WAIT_MS": stack.fetch_wait_ms, "NOTIFY_DELIVERY_IN_PROCESS": "false",
               "NOTIFICATIONS_METRICS_PORT": "0", "NOTIFICATIONS_DELIVERY_METRICS_PORT": "0",
               "CLMS_SMTP_SINK_PORT": str(free_port()), "CLMS_SMTP_SINK_HTTP_PORT": str(free_port())}
        env = {**os.environ, **ours}
        settings = Settings(_env_file=None, **ours)
        await ensure_topics(settings)
        load = os.getloadavg()[0]
        r = await idle_cpu(settings, env, idle_s=idle_s, events=int(os.environ.get("EVENTS", "20")))
        for name, cores in r.items():
            print(f"idle over {idle_s:.0f} s: {name}: {cores:.4f}{'' if name.startswith('trans') else ' core'}")
        print(f"load average before / after: {load:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
