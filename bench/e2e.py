"""Benchmark: end to end, a police identification POSTed to intake -> the alert in the CSW
on-duty officer's inbox (`notifications.alerts`), through the whole system started as `make run`
starts it (`tests/e2e/harness.running_system`: every service a separate `python -m services.<name>`
process), at a steady open-loop rate (default 100 identifications/s for 60 s).

Latency per case = the alert row's `created_at` (PostgreSQL clock, same machine) minus the wall
time the POST's response arrived; p50/p99 over every case. Also reports the POST latency at that
rate and the peak RSS (VmHWM) of every service process afterwards.

    .venv/bin/python -m bench.e2e                   # embedded Tansu + PostgreSQL
    RATE=100 SECONDS=60 .venv/bin/python -m bench.e2e
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid

import asyncpg

from bench.intake import intake_bodies
from bench.stack import peak_rss_mb
from shared.auth import mint_token


def _q(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100)[p - 1]


async def _post(reader, writer, head: bytes, body: bytes) -> tuple[int, bytes]:  # noqa: ANN001
    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:].strip())
    payload = await reader.readexactly(length) if length else b""
    return int(status_line.split()[1]), payload


async def steady_load(port: int, token: str, *, rate: float, seconds: float, connections: int = 32) -> dict:
    """Open loop: request i starts at t0 + i/rate on a free keep-alive connection."""
    head = (f"POST /v1/identifications HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: ").encode()
    total = int(rate * seconds)
    bodies = intake_bodies(total)
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    answered: dict[str, float] = {}  # case id -> wall time the response arrived
    post_ms: list[float] = []
    errors: dict[int, int] = {}
    late = 0

    async def one(i: int) -> None:
        reader, writer = await pool.get()
        try:
            t0 = time.perf_counter()
            status, payload = await _post(reader, writer, head, bodies[i])
            t1 = time.perf_counter()
            now = time.time()
        finally:
            pool.put_nowait((reader, writer))
        if status != 201:
            errors[status] = errors.get(status, 0) + 1
            return
        post_ms.append((t1 - t0) * 1000)
        answered[json.loads(payload)["case_id"]] = now

    start = time.perf_counter()
    tasks = []
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            late += 1
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not pool.empty():
        _, writer = pool.get_nowait()
        writer.close()
    return {"answered": answered, "post_ms": sorted(post_ms), "errors": errors, "sent": total,
            "achieved_rate": total / elapsed, "late_starts": late}


async def alert_latencies(database_url: str, answered: dict[str, float], *, timeout_s: float = 120) -> dict:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.time() + timeout_s
        rows: list = []
        while time.time() < deadline:
            rows = await conn.fetch(
                "select case_id::text as case_id, min(created_at) as at from notifications.alerts "
                "where recipient like 'csw.%' and event_type = 'referral.created' group by case_id")
            if sum(1 for r in rows if r["case_id"] in answered) >= len(answered):
                break
            await asyncio.sleep(1)
    finally:
        await conn.close()
    lat = sorted((r["at"].timestamp() - answered[r["case_id"]]) * 1000 for r in rows if r["case_id"] in answered)
    return {"alerts": len(lat), "missing": len(answered) - len(lat), "ms": lat}


async def run(stack, *, rate: float = 100, seconds: float = 60, log=print) -> dict:  # noqa: ANN001
    from tests.e2e.harness import running_system

    database_url = await stack.new_database("bench_e2e")
    extra = {"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap, "DATABASE_URL": database_url,
             "CLMS_TOPIC_PREFIX": f"e2e{uuid.uuid4().hex[:6]}.", "KAFKA_FETCH_MAX_WAIT_MS": stack.fetch_wait_ms,
             "LOG_JSON": "true", "LOG_LEVEL": "WARNING"}
    async with running_system(extra_env=extra) as system:
        log("e2e: system ready")
        token = mint_token(system.settings, sub="police.prizren.duty", agency="police", municipality="prizren",
                           roles=["reporter"])
        # Warm-up: a few identifications through every hop (first-use costs out of the figure).
        warm = await steady_load(system.settings.intake_port, token, rate=10, seconds=2)
        await alert_latencies(database_url, warm["answered"], timeout_s=60)
        load = await steady_load(system.settings.intake_port, token, rate=rate, seconds=seconds)
        log(f"e2e: {len(load['answered'])} of {load['sent']} identifications accepted at "
            f"{load['achieved_rate']:.0f}/s; waiting for their alerts")
        alerts = await alert_latencies(database_url, load["answered"])
        rss = {c.name: peak_rss_mb(c.proc.pid) for c in system.sup.children if c.name != "mail-sink"}
    ms, post = alerts["ms"], load["post_ms"]
    return {"rate": rate, "seconds": seconds, "achieved_rate": load["achieved_rate"], "sent": load["sent"],
            "accepted": len(load["answered"]), "errors": load["errors"], "alerts": alerts["alerts"],
            "missing_alerts": alerts["missing"], "p50_ms": _q(ms, 50), "p99_ms": _q(ms, 99),
            "max_ms": ms[-1] if ms else float("nan"), "post_p50_ms": _q(post, 50), "post_p99_ms": _q(post, 99),
            "peak_rss_mb": rss}


async def main() -> None:
    from bench.stack import start_stack

    stack = start_stack(durable_postgres=True)
    try:
        r = await run(stack, rate=float(os.environ.get("RATE", "100")), seconds=float(os.environ.get("SECONDS", "60")))
        print(json.dumps(r, indent=2))
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
