"""Benchmark: what the whole system burns when nothing happens. The system as `make run` starts
it (every service its own process, the development mail sink, the embedded broker and
PostgreSQL), warmed by 20 s at 100 identifications/s (`bench.e2e.WARM_S`), then IDLE_S seconds (default
30) with no request at all: CPU cores per process (utime+stime from /proc). Target < 0.05 core
for the whole stack, the development mail sink included (issue 18).

    .venv/bin/python -m bench.idle
    IDLE_S=60 .venv/bin/python -m bench.idle
"""

from __future__ import annotations

import asyncio
import json
import os

TARGET_CORES = 0.05


async def main() -> None:
    from bench import e2e
    from bench.stack import start_stack

    idle_s = float(os.environ.get("IDLE_S", "30"))
    stack = start_stack(durable_postgres=True)
    try:
        r = await e2e.run(stack, phases=[], idle_s=idle_s, log=lambda m: print(m, flush=True))
    finally:
        stack.close()
    idle = r["idle_cpu_cores"]
    width = max(map(len, idle))
    for name, cores in sorted(idle.items(), key=lambda kv: -kv[1]):
        print(f"{name:<{width}}  {cores:.3f}")
    total = r["idle_cpu_cores_total"]
    print(f"{'total':<{width}}  {total:.3f} cores over {idle_s:.0f} s (target < {TARGET_CORES})")
    print(json.dumps(idle))


if __name__ == "__main__":
    asyncio.run(main())
