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

    @property
    def fetch_wait_ms(self) -> str:
        # Tansu does not wake a waiting fetch: keep the wait short there (shared/tansu.py);
        # Apache Kafka answers a waiting fetch as soon as data arrives: its default
        return "20" if self.broker_kind == "tansu" else "500"

    async def new_database(self, prefix: str = "bench") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_stack(*, durable_postgres: bool = False) -> Stack:
    tmp = Path(tempfile.mkdtemp(prefix="clms-bench-"))
    stops = []
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    admin_url = os.environ.get("DATABASE_URL")
    try:
        kind = os.environ.get("CLMS_BROKER_KIND", "kafka")
        if not bootstrap:
            kind, why = choose_broker()
            print(f"bench: broker {'Apache Kafka' if kind == 'kafka' else 'Tansu'} ({why})", flush=True)
            broker = (EmbeddedKafka(free_port(), tmp / "kafka") if kind == "kafka"
                      else EmbeddedBroker(free_port(), tmp / "tansu.log")).start()
            stops.append(broker.stop)
            bootstrap = broker.bootstrap
        os.environ["CLMS_BROKER_KIND"] = kind  # the services the bench starts inherit it
        if not admin_url:
            pg = EmbeddedPostgres(tmp / "pgdata", free_port(), durable=durable_postgres).start()
            stops.append(pg.stop)
            admin_url = pg.url
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise
    return Stack(bootstrap, admin_url, "KAFKA_BOOTSTRAP_SERVERS" not in os.environ, tmp, stops,
                 broker_kind=kind)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a running process, in MB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
