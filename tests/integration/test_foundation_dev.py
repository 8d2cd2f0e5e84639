"""`clms dev` (what `make run` runs): starts the embedded broker (Apache Kafka where java and mvn
answer, else Tansu; it says which and why) and PostgreSQL, declares the topics, keeps Postgres
data and the Apache Kafka log across restarts, and leaves no process behind on SIGTERM. The
Tansu smoke run of `make test` (CLMS_BROKER=tansu) runs it on the Java-less path."""

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
from shared.kafka_broker import choose_broker
from shared.topics import REGISTRY, Topic

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

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
    needles = (f"127.0.0.1:{kafka_port}", str(data_dir / "pgdata"), str(data_dir / "kafka"))
    broker_kind, _why = choose_broker()

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
        assert ("Apache Kafka" if broker_kind == "kafka" else "Tansu") in out, "says which broker and why"
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres")
        await conn.execute("create table yesterday(note text); insert into yesterday values ('kept')")
        await conn.close()
        await _send_marker(kafka_port)
    finally:
        _stop(proc, tmp_path / "dev1.log")
    assert _processes_mentioning(*needles) == []

    proc = _start(env, tmp_path / "dev2.log")
    try:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres")
        assert await conn.fetchval("select note from yesterday") == "kept"
        await conn.close()
        if broker_kind == "kafka":  # Apache Kafka keeps its log under CLMS_DATA_DIR
            assert await _marker_still_there(kafka_port), "yesterday's event is still in the broker"
    finally:
        _stop(proc, tmp_path / "dev2.log")
    assert _processes_mentioning(*needles) == []


MARKER = b"clms-dev-marker"


async def _send_marker(port: int) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
    await producer.start()
    try:
        await producer.send_and_wait(Topic.dead_letters.value, MARKER, key=b"marker")
    finally:
        await producer.stop()


async def _marker_still_there(port: int) -> bool:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(Topic.dead_letters.value, bootstrap_servers=f"127.0.0.1:{port}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            if any(m.value == MARKER for msgs in batches.values() for m in msgs):
                return True
        return False
    finally:
        await consumer.stop()
