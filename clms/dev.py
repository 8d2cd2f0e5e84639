"""`clms dev` (what `make run` calls): a supervisor over the embedded infrastructure and the
services, each started exactly as in production: `python -m services.<name>`.

1. Start the broker (Apache Kafka where java and mvn answer, else Tansu: CLMS_BROKER) and
   PostgreSQL, unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set.
2. Declare every topic; apply every service's migrations.
3. If the broker is empty but Postgres has history, replay the outbox rows (the durable event
   log) in order, so yesterday's cases, referrals and counts come back.
4. Start every service that exists (and its companion processes: notifications' e-mail/SMS
   delivery), wait for each /readyz, print where everything listens.
5. On Ctrl-C or SIGTERM stop the services, then the infrastructure: no process left behind.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from shared.embedded import EmbeddedBroker, EmbeddedPostgres, _die_with_parent, port_open, wait_for
from shared.kafka_broker import EmbeddedKafka, choose_broker, kafka_version
from shared.settings import Settings

console = Console(stderr=True)

SERVICES = ("intake", "referral", "notifications", "analytics", "workspace")
SERVICE_SCHEMAS = {"intake": "intake", "referral": "referral", "notifications": "notifications"}
# Processes that run beside a service's own (label -> (service, module)), each `python -m <module>`
# on its own port (`<LABEL>_PORT`, /readyz): notifications sends e-mail and SMS from its own
# process, so its agent never waits behind SMTP (issue 18); the service itself then runs with
# NOTIFY_DELIVERY_IN_PROCESS=false.
COMPANIONS = {"notifications-delivery": ("notifications", "services.notifications.delivery")}


def service_exists(name: str) -> bool:
    return importlib.util.find_spec(f"services.{name}.__main__") is not None


def service_port(settings: Settings, name: str) -> int:
    return getattr(settings, f"{name}_port")


def migrations_folder(name: str) -> Path:
    spec = importlib.util.find_spec(f"services.{name}")
    assert spec and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "migrations"


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    url: str | None


class Supervisor:
    def __init__(self, settings: Settings, *, services: tuple[str, ...] = SERVICES):
        self.settings = settings
        self.wanted = [s for s in services if service_exists(s)]
        self.broker: EmbeddedBroker | EmbeddedKafka | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.children: list[Child] = []
        self.env = dict(os.environ)
        # per-service environment on top of self.env, e.g. each service's own Kafka principal
        self.service_env: dict[str, dict[str, str]] = {}
        self.log_dir = settings.data_dir / "logs"

    # --- infrastructure ------------------------------------------------------------------
    def start_infrastructure(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        if s.kafka_bootstrap_servers:
            console.print(f"[cyan]broker[/]    using KAFKA_BOOTSTRAP_SERVERS={s.kafka_bootstrap_servers}")
        else:
            kind, why = choose_broker()
            if kind == "kafka":
                console.print(f"[cyan]broker[/]    Apache Kafka {kafka_version()} (CLMS_BROKER=auto|kafka|tansu: "
                              f"kafka, because {why}); log in {s.data_dir / 'kafka'}")
                with console.status("starting Apache Kafka (KRaft, one node)..."):
                    self.broker = EmbeddedKafka(s.embedded_kafka_port, s.data_dir / "kafka").start(
                        progress=console.print)
            else:
                console.print(f"[cyan]broker[/]    Tansu (CLMS_BROKER=auto|kafka|tansu: tansu, because {why}); "
                              "it keeps nothing across restarts, the outbox is replayed into it")
                with console.status("starting the embedded Kafka-protocol broker (Tansu)..."):
                    self.broker = EmbeddedBroker(s.embedded_kafka_port, self.log_dir / "tansu.log").start()
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = self.broker.bootstrap
            self.env["CLMS_BROKER_KIND"] = kind
        if s.database_url:
            console.print("[cyan]database[/]  using DATABASE_URL")
        else:
            with console.status("starting the embedded PostgreSQL (pgserver)..."):
                self.postgres = EmbeddedPostgres(s.data_dir / "pgdata", s.embedded_postgres_port).start()
            self.env["DATABASE_URL"] = self.postgres.url
        self.settings = self.settings.model_copy(update={
            "kafka_bootstrap_servers": self.env["KAFKA_BOOTSTRAP_SERVERS"],
            "database_url": self.env["DATABASE_URL"],
            "kafka_broker_kind": self.env.get("CLMS_BROKER_KIND", s.kafka_broker_kind),
        })

    async def prepare(self) -> dict[str, int]:
        """Declare topics, migrate schemas, replay the outbox into an empty broker."""
        from shared.db import migrate_url
        from shared.kafka import ensure_topics, make_producer
        from shared.outbox import replay
        from shared.topics import Topics

        created = await ensure_topics(self.settings)
        for name, schema in SERVICE_SCHEMAS.items():
            if name in self.wanted and migrations_folder(name).exists():
                await migrate_url(self.settings.require_database(), schema=schema, folder=migrations_folder(name))
        replayed: dict[str, int] = {}
        broker_was_empty = len(created) == len(Topics(self.settings.topic_prefix).all())
        if broker_was_empty:
            import asyncpg

            from shared.db import create_pool

            pool = await create_pool(self.settings, min_size=1, max_size=2)
            producer = make_producer(self.settings, linger_ms=10)
            await producer.start()
            try:
                for name, schema in SERVICE_SCHEMAS.items():
                    if name not in self.wanted:
                        continue
                    try:
                        replayed[name] = await replay(pool=pool, schema=schema, producer=producer,
                                                      topics=Topics(self.settings.topic_prefix))
                    except asyncpg.UndefinedTableError:
                        replayed[name] = 0
            finally:
                await producer.stop()
                await pool.close()
        return replayed

    # --- services ------------------------------------------------------------------------
    def start_mail_sink(self) -> None:
        """The development SMTP sink (notifications e-mail lands there; shown at a URL)."""
        if "notifications" not in self.wanted or self.settings_env_has("SMTP_HOST"):
            return
        if importlib.util.find_spec("services.notifications.sink") is None:
            return
        s = self.settings
        log = open(self.log_dir / "mail-sink.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.notifications.sink"], env=self.env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        self.children.append(Child("mail-sink", proc, f"http://{s.host}:{s.smtp_sink_http_port}"))
        self.env.setdefault("SMTP_HOST", "127.0.0.1")
        self.env.setdefault("SMTP_PORT", str(s.smtp_sink_port))

    def settings_env_has(self, name: str) -> bool:
        return bool(os.environ.get(name))

    def start_services(self) -> None:
        self.start_mail_sink()
        for name in self.wanted:
            companions = self.companions_of(name)
            if "notifications-delivery" in companions:
                self.service_env.setdefault(name, {})["NOTIFY_DELIVERY_IN_PROCESS"] = "false"
            self.start_service(name)
            for label in companions:
                self.start_service(label)

    def companions_of(self, name: str) -> list[str]:
        return [label for label, (owner, module) in COMPANIONS.items()
                if owner == name and importlib.util.find_spec(module) is not None]

    def start_service(self, name: str, *, label: str | None = None, port: int | None = None) -> Child:
        """Start (or restart) one service as `python -m services.<name>`. A second replica of a
        service needs its own `label` and HTTP `port` (tests use this for rebalances); it runs
        without a monitoring port (the first replica holds `<NAME>_METRICS_PORT`)."""
        label = label or name
        owner, module = COMPANIONS.get(name, (name, f"services.{name}"))  # a companion: its service's env
        key = name.replace("-", "_")
        self.children = [c for c in self.children if c.name != label or c.proc.poll() is None]
        env = dict(self.env)
        if port:
            env[f"{key.upper()}_METRICS_PORT"] = "0"
        port = port or service_port(self.settings, key)
        env[f"{key.upper()}_PORT"] = str(port)
        env.update(self.service_env.get(owner, {}))
        log = open(self.log_dir / f"{label}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", module], env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        child = Child(label, proc, f"http://{self.settings.host}:{port}")
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name and c.proc.poll() is None)

    def wait_ready(self, timeout_s: float = 90, only: str | None = None) -> None:
        for child in self.children:
            if only and child.name != only:
                continue
            def ready(c: Child = child) -> bool:
                if c.proc.poll() is not None:
                    log_path = self.log_dir / (c.name + ".log")
                    tail = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else []
                    raise RuntimeError(
                        f"service {c.name} exited with code {c.proc.returncode}; see {log_path}. Last lines:\n"
                        + "\n".join(tail)
                    )
                try:
                    return httpx.get(f"{c.url}/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False
            if child.name == "mail-sink":
                port = self.settings.smtp_sink_port
                wait_for(lambda: port_open(port) or child.proc.poll() is not None,
                         timeout_s=30, what=f"the SMTP sink on port {port}")
                continue
            with console.status(f"waiting for {child.name} to be ready..."):
                wait_for(ready, timeout_s=timeout_s, what=f"{child.name} /readyz", interval_s=0.3)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
        self.children.clear()
        if self.broker:
            self.broker.stop()
        if self.postgres:
            self.postgres.stop()

    def summary(self, replayed: dict[str, int]) -> Table:
        t = Table(title="CLMS referral services (development)", show_lines=False)
        t.add_column("what")
        t.add_column("where")
        embedded = ""
        if isinstance(self.broker, EmbeddedKafka):
            embedded = f" (embedded Apache Kafka {kafka_version()}, log in {self.broker.data_dir})"
        elif self.broker:
            embedded = " (embedded Tansu, memory only)"
        t.add_row("Kafka broker", self.env["KAFKA_BOOTSTRAP_SERVERS"] + embedded)
        t.add_row("PostgreSQL", self.env["DATABASE_URL"] + (f" (data in {self.settings.data_dir}/pgdata)"
                                                            if self.postgres else ""))
        for c in self.children:
            if c.name == "mail-sink":
                t.add_row("mail sink", f"{c.url}  (e-mails and SMS webhooks the services sent)")
            elif c.name in COMPANIONS:
                t.add_row(c.name, f"{c.url}/readyz")
            else:
                t.add_row(c.name, f"{c.url}  (docs: {c.url}/docs)")
        t.add_row("logs", str(self.log_dir))
        if replayed:
            t.add_row("replayed", ", ".join(f"{k}: {v} events" for k, v in replayed.items()))
        return t


def run_dev(settings: Settings, *, services: tuple[str, ...] = SERVICES) -> int:
    sup = Supervisor(settings, services=services)
    stopping = False

    def _on_signal(signum, frame):  # noqa: ANN001
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        sup.start_infrastructure()
        replayed = asyncio.run(sup.prepare())
        sup.start_services()
        sup.wait_ready()
        console.print(sup.summary(replayed))
        console.print("[green]ready[/]: Ctrl-C stops everything. Try: "
                      "clms token --agency police --municipality prizren --role reporter")
        while True:
            for c in sup.children:
                if c.proc.poll() is not None:
                    console.print(f"[red]{c.name} exited with code {c.proc.returncode}[/]; "
                                  f"see {sup.log_dir / (c.name + '.log')}. Stopping everything.")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping...")
        return 0
    except Exception as exc:  # noqa: BLE001 - print a sentence, not a traceback
        console.print(f"[red]could not start[/]: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop()
        console.print("stopped: no process left behind")
