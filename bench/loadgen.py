"""The bench's HTTP load generator, written once and used by every part that sends requests: a
small keep-alive HTTP/1.1 client on asyncio streams (wrk is not assumed), the same for our
services and for the bare baselines.

- `closed_loop`: `concurrency` clients, each sending its next POST as soon as the last one is
  answered, for `duration` seconds after `warmup` (throughput: req/s, p50/p99).
- `open_loop`: request i starts at t0 + i/rate on a free kept-alive connection, whatever the
  answers (a steady arrival rate: what an end-to-end latency is measured under).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping, Sequence


def post_head(path: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The request line and headers of a JSON POST, up to the Content-Length value."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "Content-Length: ").encode()


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
               body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a kept-alive connection: (status, body)."""
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


def _count(errors: dict[int, int], status: int) -> None:
    errors[status] = errors.get(status, 0) + 1


async def closed_loop(port: int, path: str, bodies: Sequence[bytes], headers: Mapping[str, str] | None = None, *,
                      duration: float, warmup: float, concurrency: int, ok: int = 201) -> dict:
    """req/s and p50/p99 (ms) of the answers `ok` that started after the warm-up; `n_all` counts
    every request sent (warm-up included), for CPU per request."""
    head = post_head(path, headers)
    latencies: list[float] = []
    errors: dict[int, int] = {}
    counter = iter(range(10**9))
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                status, _ = await post(reader, writer, head, bodies[next(counter) % len(bodies)])
                t1 = time.perf_counter()
                if status != ok:
                    _count(errors, status)
                elif t0 >= measure_from:
                    latencies.append(t1 - t0)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 100 else [float("nan")] * 99
    return {"rps": len(latencies) / duration, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "n": len(latencies), "errors": errors, "n_all": next(counter)}


async def open_loop(port: int, path: str, bodies: Sequence[bytes], headers: Mapping[str, str] | None = None, *,
                    rate: float, seconds: float, connections: int = 32, ok: int = 201) -> dict:
    """Send rate*seconds POSTs at a steady rate. Returns the `ok` answers as (payload, wall time
    the answer arrived), their latencies in ms (sorted), the other statuses counted, the rate
    achieved and how many requests started more than 50 ms late (the generator fell behind)."""
    head = post_head(path, headers)
    total = int(rate * seconds)
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    answers: list[tuple[bytes, float]] = []
    latency_ms: list[float] = []
    errors: dict[int, int] = {}
    late = 0

    async def one(i: int) -> None:
        reader, writer = await pool.get()
        try:
            t0 = time.perf_counter()
            status, payload = await post(reader, writer, head, bodies[i % len(bodies)])
            t1 = time.perf_counter()
            now = time.time()
        finally:
            pool.put_nowait((reader, writer))
        if status != ok:
            _count(errors, status)
            return
        latency_ms.append((t1 - t0) * 1000)
        answers.append((payload, now))

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
    return {"answers": answers, "latency_ms": sorted(latency_ms), "errors": errors, "sent": total,
            "achieved_rate": total / elapsed if elapsed > 0 else float("inf"), "late_starts": late}
