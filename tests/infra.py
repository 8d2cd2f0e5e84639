"""The real broker and the real PostgreSQL the tests talk to, chosen once per test session:

1. `KAFKA_BOOTSTRAP_SERVERS` / `DATABASE_URL` from the environment, if set;
2. else testcontainers (Apache Kafka and PostgreSQL images) when a Docker engine answers;
3. else the embedded pair the project ships: Apache Kafka (KRaft, from Maven-resolved jars) where
   `java` and `mvn` answer, else Tansu (CLMS_BROKER=auto|kafka|tansu picks), and PostgreSQL
   from pgserver.

Each test then isolates itself: its own topic prefix (so its own topics and consumer groups)
and its own database, created fresh from the admin URL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from shared.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from shared.kafka_broker import EmbeddedKafka, choose_broker
from shared.settings import Settings


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


@dataclass
class Infra:
    bootstrap: str
    admin_db_url: str
    kind: str  # "environment", "testcontainers" or "embedded"
    broker_kind: str = "kafka"  # "kafka" (Apache Kafka) or "tansu"
    broker_version: str = ""
    broker_why: str = ""
    embedded_broker: EmbeddedBroker | EmbeddedKafka | None = None
    embedded_postgres: EmbeddedPostgres | None = None
    data_dir: Path | None = None  # the embedded broker's and PostgreSQL's folder (their logs too)
    _cleanup: list[Any] = field(default_factory=list)

    @property
    def is_tansu(self) -> bool:
        return self.broker_kind == "tansu"

    def describe(self) -> str:
        broker = "Tansu" if self.is_tansu else "Apache Kafka"
        why = f" ({self.broker_why})" if self.broker_why else ""
        return f"{broker} {self.broker_version}".strip() + why

    def close(self) -> None:
        for c in reversed(self._cleanup):
            try:
                c()
            except Exception:  # noqa: BLE001
                pass

    def settings(self, *, db_url: str, prefix: str, **extra: Any) -> Settings:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "DATABASE_URL": db_url,
            "CLMS_TOPIC_PREFIX": prefix,
            "CLMS_ENV": "test",
            "CLMS_BROKER_KIND": self.broker_kind,
            "KAFKA_REBALANCE_TIMEOUT_S": "2",
            "KAFKA_SESSION_TIMEOUT_S": "6",
            "OUTBOX_POLL_INTERVAL_S": "0.02",
            "LOG_JSON": "false",
            "DB_POOL_MIN": "1",
            "DB_POOL_MAX": "5",
        }
        env.update({k: str(v) for k, v in extra.items()})
        return Settings(_env_file=None, **env)  # type: ignore[call-arg]


def start_infra() -> Infra:
    env_kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    env_db = os.environ.get("DATABASE_URL")
    if env_kafka and env_db:
        return Infra(env_kafka, env_db, "environment")
    if not (env_kafka or env_db) and docker_answers() and os.environ.get("CLMS_TEST_NO_DOCKER") != "1":
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        kafka = KafkaContainer("apache/kafka:3.9.1").with_kraft().start()
        pg = PostgresContainer("postgres:16-alpine", driver=None).start()
        infra = Infra(kafka.get_bootstrap_server(), pg.get_connection_url(), "testcontainers")
        infra._cleanup += [kafka.stop, pg.stop]
        return infra
    tmp = Path(tempfile.mkdtemp(prefix="clms-test-"))
    infra = Infra("", "", "embedded", data_dir=tmp)
    if env_kafka:
        infra.bootstrap = env_kafka
        infra.broker_kind = os.environ.get("CLMS_BROKER_KIND", "kafka")
    else:
        kind, why = choose_broker()
        print(f"\n[infra] broker: {'Apache Kafka' if kind == 'kafka' else 'Tansu'} ({why})", flush=True)
        if kind == "kafka":
            broker = EmbeddedKafka(free_port(), tmp / "kafka").start()
            infra.broker_version = broker.version
        else:
            broker = EmbeddedBroker(free_port(), tmp / "tansu.log").start()
            infra.broker_version = "0.6.0"
        infra.broker_kind = kind
        infra.broker_why = why
        infra.embedded_broker = broker
        infra.bootstrap = broker.bootstrap
        infra._cleanup.append(broker.stop)
    if env_db:
        infra.admin_db_url = env_db
    else:
        pg = EmbeddedPostgres(tmp / "pgdata", free_port(), durable=False).start()
        infra.embedded_postgres = pg
        infra.admin_db_url = pg.url
        infra._cleanup.append(pg.stop)
    infra._cleanup.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    return infra


# --- logs of a failed run ----------------------------------------------------------------------------

LOGS = Path(__file__).resolve().parent / "artifacts" / "logs"
LIVE_SYSTEMS: dict[str, Path] = {}  # label -> data folder of each whole system running now (tests/e2e/harness.py)
KEPT_LOGS: list[str] = []  # one line per copy, repeated in the run's closing summary


def keep_logs(source: Path, label: str, why: str) -> Path | None:
    """Copy the *.log files below `source` (the services', the broker's, PostgreSQL's; not the
    broker's data segments) to tests/artifacts/logs/<label>, and say so in the run's summary."""
    files = [f for f in source.rglob("*.log") if "kraft-logs" not in f.parts and f.is_file()]
    if not files:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:120]
    dest = LOGS / safe
    for f in files:
        target = dest / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    KEPT_LOGS.append(f"[logs] {why}: {len(files)} log file(s) kept in {dest}")
    return dest


def _with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def create_database(infra: Infra) -> str:
    """A fresh, empty database for one test; returns its URL."""
    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(infra.admin_db_url)
    try:
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    return _with_database(infra.admin_db_url, name)


async def drop_database(infra: Infra, url: str) -> None:
    name = url.rsplit("/", 1)[-1].split("?")[0]
    conn = await asyncpg.connect(infra.admin_db_url)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await conn.close()


async def db_rows(settings, sql: str, *args) -> list:
    """The rows of one query on the test's database (a connection of its own, closed after)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def wait_until(predicate, *, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll an async or sync predicate until it returns a truthy value; fail with `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = None
    while loop.time() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last value: {last!r})")
