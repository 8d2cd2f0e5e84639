"""Benchmark: identifications per second and p50/p99 latency at 32 concurrent clients against
`python -m services.intake` (JWT check, validation, HMAC pseudonym, per-case envelope encryption,
case + key + history + audit + outbox rows in one transaction, relay publishing to the broker),
next to the bare baseline (`../shared/baselines/intake_baseline.py`: FastAPI + pydantic + one
transaction with a case row and an outbox row) on the same PostgreSQL in the same run.
Prints both figures and the ratio (issue 18: target >= 0.8 with p99 < 50 ms).

    .venv/bin/python -m bench.intake                       # embedded broker (bench.stack) + PostgreSQL
    DURATION=10 CONCURRENCY=32 .venv/bin/python -m bench.intake
    KAFKA_BOOTSTRAP_SERVERS=... DATABASE_URL=... .venv/bin/python -m bench.intake

Both servers run as one uvicorn process each (as the baseline's usage line says); the load
generator is a small keep-alive HTTP/1.1 client on asyncio streams (wrk is not assumed), the same
for both.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import asyncpg

from bench.loadgen import closed_loop
from shared.auth import mint_token
from shared.embedded import free_port
from shared.kafka import ensure_topics
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BASELINE_DIR = Path(os.environ.get("BASELINE_DIR", ROOT.parent / "shared" / "baselines"))
DURATION = float(os.environ.get("DURATION", "5"))  # per round and server
WARMUP = float(os.environ.get("WARMUP", "1"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))  # baseline and intake alternate, so noise hits both
CONCURRENCY = int(os.environ.get("CONCURRENCY", "32"))
TARGET_RATIO = 0.8  # intake req/s over the bare baseline's, same run (issue 18)
TARGET_P99_MS = 50

GIVEN = ["Arber", "Besnik", "Drita", "Elira", "Fatos", "Genta", "Jeton", "Liridona", "Mimoza", "Valon"]
FAMILY = ["Krasniqi", "Berisha", "Gashi", "Hoxha", "Morina", "Shala", "Kelmendi", "Bytyqi"]


def intake_bodies(n: int) -> list[bytes]:
    rnd = random.Random(7)
    today = date.today()
    out = []
    for i in range(n):
        age = rnd.randint(5, 17)
        out.append(json.dumps({
            "municipality": rnd.choice(["prizren", "prishtine", "ferizaj", "gjakove", "peje"]),
            "identified_on": today.isoformat(),
            "child": {"given_name": rnd.choice(GIVEN), "family_name": f"{rnd.choice(FAMILY)}{i}",
                      "date_of_birth": (today - timedelta(days=age * 365 + rnd.randint(1, 300))).isoformat(),
                      "sex": rnd.choice(["female", "male"]), "community": "roma", "school_status": "dropped_out",
                      "guardian": {"name": "Guardian Name", "relationship": "mother", "phone": "+383 44 000 000"}},
            "work": {"sector": "street_work", "activity": "street_vending", "hazardous": False},
            "notes": "bench",
        }).encode())
    return out


BASELINE_BODY = b'{"municipality":"prishtine","age":12,"sex":"F","form":"street_work"}'


def cpu_seconds(match) -> float:  # noqa: ANN001
    """utime+stime of every process whose command line satisfies `match` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not match(cmd):
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def _pid_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


async def wait_ready(port: int, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.time() + timeout_s
    async with httpx.AsyncClient() as c:
        while time.time() < deadline:
            try:
                if (await c.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("intake did not become ready")


async def create_db(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def run(stack, *, duration: float = DURATION, warmup: float = WARMUP, rounds: int = ROUNDS,
              concurrency: int = CONCURRENCY, log=print) -> dict:  # noqa: ANN001
    """Baseline and intake as one uvicorn process each on `stack` (a bench.stack.Stack),
    alternating rounds; returns the median round's figures."""
    tmp = Path(tempfile.mkdtemp(prefix="clms-bench-intake-", dir=stack.tmp))
    procs: list[subprocess.Popen] = []
    try:
        bootstrap, admin_url = stack.bootstrap, stack.admin_url
        tag = uuid.uuid4().hex[:8]
        intake_db = await create_db(admin_url, f"bench_intake_{tag}")
        base_db = await create_db(admin_url, f"bench_baseline_{tag}")

        base_port, intake_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "intake_baseline:app", "--port", str(base_port), "--no-access-log",
             "--log-level", "warning"], cwd=BASELINE_DIR, env={**os.environ, "DATABASE_URL": base_db}))
        env = {**os.environ, "DATABASE_URL": intake_db, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
               "INTAKE_PORT": str(intake_port), "CLMS_TOPIC_PREFIX": f"bench{tag}.", "LOG_LEVEL": "WARNING",
               "KAFKA_FETCH_MAX_WAIT_MS": stack.fetch_wait_ms,
               "DB_POOL_MIN": "4", "DB_POOL_MAX": "16", "CLMS_ENV": "test",
               # one principal from one address measures throughput, not the rate limits
               "WRITE_RATE_LIMIT_PRINCIPAL": "100000/second", "WRITE_RATE_LIMIT_ADDRESS": "100000/second"}
        settings = Settings(_env_file=None, **{k: v for k, v in env.items() if k.isupper()})  # type: ignore[arg-type]
        await ensure_topics(settings)
        procs.append(subprocess.Popen([sys.executable, *(os.environ.get("INTAKE_CMD", "-m services.intake").split())], cwd=ROOT, env=env,
                                      stdout=open(tmp / "intake.log", "wb"), stderr=subprocess.STDOUT))
        wait_port(base_port)
        await wait_ready(intake_port)

        token = mint_token(settings, sub="police.prizren.duty", agency="police", municipality="prizren",
                           roles=["reporter"])
        opts = dict(duration=duration, warmup=warmup, concurrency=concurrency)
        bodies = intake_bodies(20000)
        results = []
        base_pid, intake_pid = procs[0].pid, procs[1].pid

        server_cpu = _pid_cpu

        def pg_cpu() -> float:  # the stack's own PostgreSQL when it started one, not others on the machine
            return stack.infra_cpu_seconds().get("postgres") or cpu_seconds(lambda cmd: cmd.startswith("postgres"))

        async def measured(pid: int, *args, **kw) -> dict:  # noqa: ANN002, ANN003
            s0, p0 = server_cpu(pid), pg_cpu()
            result = await closed_loop(*args, **kw)
            total = result["n_all"] or 1
            result["server_ms"] = (server_cpu(pid) - s0) * 1000 / total
            result["pg_ms"] = (pg_cpu() - p0) * 1000 / total
            return result

        for i in range(rounds):
            b = await measured(base_pid, base_port, "/cases", [BASELINE_BODY], {}, **opts)
            o = await measured(intake_pid, intake_port, "/v1/identifications", bodies[i::rounds],
                               {"Authorization": f"Bearer {token}"}, **opts)
            results.append((b, o))
            log(f"intake round {i + 1}: baseline {b['rps']:.0f} req/s p99 {b['p99_ms']:.0f} ms "
                f"cpu/req server {b['server_ms']:.2f} ms pg {b['pg_ms']:.2f} ms | intake {o['rps']:.0f} req/s "
                f"p99 {o['p99_ms']:.0f} ms cpu/req server {o['server_ms']:.2f} ms pg {o['pg_ms']:.2f} ms "
                f"| ratio {o['rps'] / b['rps']:.2f}")
        ratios = sorted(o["rps"] / b["rps"] for b, o in results)
        mid = sorted(range(rounds), key=lambda k: results[k][1]["rps"] / results[k][0]["rps"])[rounds // 2]
        base, ours = results[mid]

        conn = await asyncpg.connect(intake_db)
        try:
            deadline = time.time() + 30
            while time.time() < deadline and await conn.fetchval(
                    "select count(*) from intake.outbox where published_at is null"):
                await asyncio.sleep(0.2)
            backlog = await conn.fetchval("select count(*) from intake.outbox where published_at is null")
        finally:
            await conn.close()
        return {"baseline": base, "intake": ours, "ratio": statistics.median(ratios), "rounds": rounds,
                "duration_s": duration, "concurrency": concurrency, "outbox_backlog_after_30s": backlog}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


async def main() -> None:
    from bench.stack import start_stack

    stack = start_stack()
    try:
        r = await run(stack, log=lambda s: print(s, flush=True))
        base, ours = r["baseline"], r["intake"]
        print(f"\n{CONCURRENCY} concurrent clients, {ROUNDS} alternating rounds of {DURATION:.0f} s "
              f"(after {WARMUP:.0f} s warm-up); the median round:")
        print(f"{'':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8}")
        for name, x in (("baseline", base), ("intake", ours)):
            print(f"{name:10} {x['rps']:9.0f} {x['p50_ms']:8.1f} {x['p99_ms']:8.1f} {sum(x['errors'].values()):8d}")
        print(f"intake_over_baseline_ratio={r['ratio']:.2f} (target >= {TARGET_RATIO}), "
              f"intake p99={ours['p99_ms']:.1f} ms (target < {TARGET_P99_MS}), outbox rows still unpublished 30 s later: {r['outbox_backlog_after_30s']}")
        if ours["errors"] or base["errors"]:
            print(f"non-201 answers: baseline {base['errors']}, intake {ours['errors']}")
    finally:
        stack.close()


if __name__ == "__main__":
    asyncio.run(main())
