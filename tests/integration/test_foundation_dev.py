"""`clms dev` (what `make run` runs): starts the embedded broker and PostgreSQL, declares the
topics, keeps Postgres data across restarts, and leaves no process behind on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from shared.embedded import free_port
from shared.topics import REGISTRY

pytestmark = pytest.mark.integration

CLMS = str(Path(sys.executable).with_name("clms"))


def _env(data_dir: Path, kafka_port: int, pg_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}
    env.update(CLMS_DATA_DIR=str(data_dir), CLMS_KAFKA_PORT=str(kafka_port),
               CLMS_POSTGRES_PORT=str(pg_port), CLMS_TOPIC_PREFIX="", COLUMNS="200")
    return env


def _processes_mentioning(*needles: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{pid}: {cmd.strip()}")
    return found


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([CLMS, "dev", "--services", ""], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "ready" in text and "Ctrl-C" in text:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"clms dev exited early with {proc.returncode}:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("clms dev did not become ready in 120 s:\n" + log.read_text(errors="replace"))


def _stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text(errors="replace")
    assert "no process left behind" in log.read_text(errors="replace")


async def test_clms_dev_starts_the_stack_keeps_data_and_stops_cleanly(tmp_path):
    data_dir = tmp_path / "clms-data"
    kafka_port, pg_port = free_port(), free_port()
    env = _env(data_dir, kafka_port, pg_port)
    needles = (f"127.0.0.1:{kafka_port}", str(data_dir / "pgdata"))

    proc = _start(env, tmp_path / "dev1.log")
    try:
        out = (tmp_path / "dev1.log").read_text()
        assert f"127.0.0.1:{kafka_port}" in out and str(pg_port) in out, out
        topics = subprocess.run([CLMS, "topics"], env=env, capture_output=True, text=True, timeout=60)
        assert topics.returncode == 0, topics.stderr
        for spec in REGISTRY:
            # piped: tab-separated, topic then partitions
            row = next((ln.split("\t") for ln in topics.stdout.splitlines() if ln.startswith(spec.topic.value)), None)
            assert row is not None, f"{spec.topic.value} missing from:\n{topics.stdout}"
            assert row[:2] == [spec.topic.value, str(spec.partitions)], row
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres")
        await conn.execute("create table yesterday(note text); insert into yesterday values ('kept')")
        await conn.close()
    finally:
        _stop(proc, tmp_path / "dev1.log")
    assert _processes_mentioning(*needles) == []

    proc = _start(env, tmp_path / "dev2.log")
    try:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres")
        assert await conn.fetchval("select note from yesterday") == "kept"
        await conn.close()
    finally:
        _stop(proc, tmp_path / "dev2.log")
    assert _processes_mentioning(*needles) == []
