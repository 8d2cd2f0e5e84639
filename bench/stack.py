"""The infrastructure a benchmark run needs, started once: the embedded broker `make run` uses
(Apache Kafka where java and mvn answer, else Tansu: CLMS_BROKER) and PostgreSQL (pgserver), or
the ones KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point at."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from shared.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from shared.kafka_broker import EmbeddedKafka, choose_broker


def is_broker_process(cmd: str) -> bool:
    """The embedded broker's process, for CPU accounting: Tansu or the Apache Kafka JVM."""
    return "tansu" in cmd or "kafka.Kafka" in cmd


@dataclass
class Stack:
    bootstrap: str
    admin_url: str
    embedded_broker: bool
    tmp: Path
    _stops: list = field(default_factory=list)
    broker_kind: str = "kafka"
    broker_pid: int | None = None  # None: an external broker (not measured)
    postgres_pid: int | None = None  # the postmaster; None: an external PostgreSQL

    def infra_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the broker and of PostgreSQL (the postmaster with every backend
        and helper process it started), only those this stack started: other brokers and
        databases on a shared machine are not counted."""
        out = {}
        if self.broker_pid:
            out["broker"] = tree_cpu_seconds(self.broker_pid)
        if self.postgres_pid:
            out["postgres"] = tree_cpu_seconds(self.postgres_pid)
        return out

    @property
    def fetch_wait_ms(self) -> str:
        """The services' own choice for this broker (shared/tansu.py), or BENCH_FETCH_WAIT_MS."""
        from types import SimpleNamespace

        from shared import tansu

        return os.environ.get("BENCH_FETCH_WAIT_MS") or str(
            tansu.fetch_max_wait_ms(SimpleNamespace(kafka_broker_kind=self.broker_kind)))

    async def new_database(self, prefix: str = "bench") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    async def drop_bench_databases(self) -> list[str]:
        """Drop every database a bench part created (named bench...): the next part, above all
        the e2e part's idle window, should not pay for an earlier part's leftovers (autovacuum
        workers visiting their tables: PostgreSQL idled at 0.012-0.015 core in full runs against
        0.001-0.002 on a fresh stack)."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            names = [r[0] for r in await conn.fetch("select datname from pg_database where datname like 'bench%'")]
            for name in names:
                await conn.execute(f'drop database "{name}" with (force)')
        finally:
            await conn.close()
        return names

    async def delete_bench_topics(self) -> list[str]:
        """Delete every topic but the broker's own (__consumer_offsets, ...): each part uses
        topics of its own prefix, and partitions left over keep the broker's periodic work
        (high-watermark checkpoints every 5 s, the log cleaner's passes over compacted changelogs)
        larger in the next part's idle window. Only on the broker this stack started: an external
        one (KAFKA_BOOTSTRAP_SERVERS) may hold topics that are not the bench's."""
        from aiokafka.admin import AIOKafkaAdminClient

        if not self.embedded_broker:
            return []

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=15000)
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if not t.startswith("__")]
            if names:
                await admin.delete_topics(names)
        finally:
            await admin.close()
        return names

    def close(self) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_stack(*, durable_postgres: bool = False, broker: str | None = None) -> Stack:
    """Start what is missing. `broker` ("kafka" or "tansu") picks the embedded broker for this
    stack alone (the services it starts are told by their environment); default: CLMS_BROKER."""
    tmp = Path(tempfile.mkdtemp(prefix="clms-bench-"))
    stops = []
    pids: dict[str, int] = {}
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    admin_url = os.environ.get("DATABASE_URL")
    try:
        kind = os.environ.get("CLMS_BROKER_KIND", "kafka")
        if broker:
            bootstrap, kind = None, broker
        if not bootstrap:
            kind, why = choose_broker(broker)
            print(f"bench: broker {'Apache Kafka' if kind == 'kafka' else 'Tansu'} ({why})", flush=True)
            embedded = (EmbeddedKafka(free_port(), tmp / "kafka") if kind == "kafka"
                        else EmbeddedBroker(free_port(), tmp / "tansu.log")).start()
            stops.append(embedded.stop)
            bootstrap = embedded.bootstrap
            pids["broker_pid"] = embedded.proc.pid
        if not broker:
            os.environ["CLMS_BROKER_KIND"] = kind  # the services the bench starts inherit it
        if not admin_url:
            pg = EmbeddedPostgres(tmp / "pgdata", free_port(), durable=durable_postgres).start()
            stops.append(pg.stop)
            admin_url = pg.url
            pids["postgres_pid"] = pg.proc.pid
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise
    return Stack(bootstrap, admin_url, "broker_pid" in pids, tmp, stops, broker_kind=kind, **pids)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a running process, in MB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (0: state, 1: ppid, 11-14: utime, stime,
    cutime, cstime in clock ticks)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants: the live ones, and the ones
    that exited, through the reaped-children times of their parent (a PostgreSQL backend that
    ended is in the postmaster's). Linux /proc."""
    parent: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (f := _stat(d.name)) is not None:
            stats[int(d.name)] = f
            parent[int(d.name)] = int(f[1])
    children: dict[int, list[int]] = {}
    for child, ppid in parent.items():
        children.setdefault(ppid, []).append(child)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f is None:
            continue
        total += sum(int(x) for x in f[11:15])
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")
