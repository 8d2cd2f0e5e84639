"""The embedded Apache Kafka broker: a single KRaft node (broker + controller) run as a JVM child
process of `clms dev` or the test session, its jars resolved from Maven Central by Maven.

- `shared/broker/pom.xml` pins the release (and says why); `mvn dependency:build-classpath`
  resolves it into `~/.cache/clms/m2` (outside the repository) once, after which the classpath
  is read from a cache file and no network is needed.
- The log directory is formatted once with Kafka's own storage tool and kept under
  `CLMS_DATA_DIR`, so a second `make run` finds yesterday's events in the broker.
- `secured=True` starts the production access model: SASL/SCRAM-SHA-512 on the client listener,
  the standard KRaft authorizer, `admin` as the only super user. Service principals and ACLs are
  then applied with the generated `deploy/kafka/init-security.sh` (see `apply_security`).

`choose_broker()` implements CLMS_BROKER=auto|kafka|tansu.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shared.embedded import _die_with_parent, _stop_process, free_port, port_open, wait_for

POM = Path(__file__).with_name("broker") / "pom.xml"
CACHE = Path(os.environ.get("CLMS_CACHE_DIR", Path.home() / ".cache" / "clms"))
ADMIN_USER = "admin"


def kafka_version() -> str:
    text = POM.read_text()
    return text.split("<kafka.version>", 1)[1].split("</kafka.version>", 1)[0].strip()


def java_and_maven() -> str | None:
    """None when `java` and `mvn` both answer, else the reason Apache Kafka cannot run here."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH"
    return None


def choose_broker(wanted: str | None = None) -> tuple[str, str]:
    """('kafka' | 'tansu', why) for CLMS_BROKER=auto|kafka|tansu (default auto)."""
    wanted = (wanted or os.environ.get("CLMS_BROKER") or "auto").strip().lower()
    if wanted not in ("auto", "kafka", "tansu"):
        raise RuntimeError(f"CLMS_BROKER={wanted!r} is not one of auto, kafka, tansu; unset it or pick one")
    if wanted == "tansu":
        return "tansu", "CLMS_BROKER=tansu"
    missing = java_and_maven()
    if wanted == "kafka":
        if missing:
            raise RuntimeError(
                f"CLMS_BROKER=kafka but {missing}: install a JDK (17+) and Maven, or set CLMS_BROKER=tansu"
            )
        return "kafka", "CLMS_BROKER=kafka"
    if missing:
        return "tansu", f"{missing}, so Apache Kafka cannot run here"
    return "kafka", "java and mvn are present"


def classpath(*, progress=print) -> str:
    """The broker's classpath, resolved by Maven on first use and cached."""
    pom_digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    cp_file = CACHE / f"kafka-{kafka_version()}-{pom_digest}.classpath"
    if cp_file.exists():
        cp = cp_file.read_text().strip()
        if all(Path(p).exists() for p in cp.split(os.pathsep)):
            return cp
    missing = java_and_maven()
    if missing:
        raise RuntimeError(f"cannot resolve Apache Kafka: {missing}. Install a JDK and Maven, or set CLMS_BROKER=tansu")
    CACHE.mkdir(parents=True, exist_ok=True)
    progress(f"resolving Apache Kafka {kafka_version()} from Maven Central (once; cached in {CACHE}/m2)...")
    tmp = cp_file.with_suffix(".tmp")
    done = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), f"-Dmaven.repo.local={CACHE / 'm2'}",
         "dependency:build-classpath", f"-Dmdep.outputFile={tmp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0 or not tmp.exists():
        tail = done.stdout.decode(errors="replace").strip()[-1500:]
        raise RuntimeError(
            f"Maven could not resolve Apache Kafka {kafka_version()} from {POM}: {tail}\n"
            "Check that Maven Central is reachable (or a mirror in ~/.m2/settings.xml), "
            "or set CLMS_BROKER=tansu."
        )
    tmp.replace(cp_file)
    return cp_file.read_text().strip()


def _cluster_id(seed: str) -> str:
    """A KRaft cluster id (base64url of 16 bytes, no padding), fixed per log directory. Like
    Kafka's own Uuid.randomUuid, never one that starts with "-": the storage tool's argument
    parser would read it as an option ("argument --cluster-id/-t: expected one argument")."""
    attempt = 0
    while True:
        raw = uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}#{attempt}" if attempt else seed).bytes
        cluster_id = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
        attempt += 1


LOG4J = """\
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
"""


@dataclass
class EmbeddedKafka:
    """Apache Kafka (KRaft, one node) on 127.0.0.1:`port`, its log in `data_dir`."""

    port: int
    data_dir: Path
    secured: bool = False
    admin_password: str = "admin-dev-password"
    heap_mb: int = 768
    proc: subprocess.Popen | None = field(default=None, init=False)
    controller_port: int = field(default=0)

    kind = "kafka"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def version(self) -> str:
        return kafka_version()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"

    def _properties(self) -> str:
        logs = self.data_dir / "kraft-logs"
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            "controller.listener.names=CONTROLLER",
            f"log.dirs={logs}",
            "num.partitions=1",
            "default.replication.factor=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "group.initial.rebalance.delay.ms=0",
            # topics are declared explicitly (shared/topics.py), as in production
            "auto.create.topics.enable=false",
            "delete.topic.enable=true",
            "log.segment.bytes=16777216",
            "log.retention.check.interval.ms=60000",
            # a deleted topic's files go after 1 s instead of a minute (the bench deletes each
            # part's topics; their deletion then no longer lands in the next part's idle window)
            "log.segment.delete.delay.ms=1000",
            "num.network.threads=2",
            "num.io.threads=4",
            "background.threads=4",
            "log.cleaner.threads=1",
            "log.cleaner.dedupe.buffer.size=8388608",
            "group.min.session.timeout.ms=1000",
            # Idle cost of a one-node development broker (bench/README.md, idle): no no-op
            # record on the metadata log every 500 ms (they tell followers and brokers that the
            # controller lives; here the node is its own follower), and the node's heartbeat to
            # its own controller every 5 s rather than 2 s (at startup it heartbeats without
            # waiting until caught up). Together: 0.13 -> 0.08 of a core with no client at all.
            "metadata.max.idle.interval.ms=0",
            "broker.heartbeat.interval.ms=5000",
            "broker.session.timeout.ms=15000",
        ]
        if self.secured:
            jaas = (f'org.apache.kafka.common.security.scram.ScramLoginModule required '
                    f'username="{ADMIN_USER}" password="{self.admin_password}";')
            lines += [
                f"listeners=SASL_PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{self.port}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
                "inter.broker.listener.name=SASL_PLAINTEXT",
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
                f"listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={jaas}",
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found=false",
                # the controller listener is loopback-only plaintext, so the node's own
                # controller traffic is ANONYMOUS; no client listener accepts ANONYMOUS
                f"super.users=User:{ADMIN_USER};User:ANONYMOUS",
            ]
        else:
            lines += [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
            ]
        return "\n".join(lines) + "\n"

    def _java(self, main: str, *args: str, cp: str) -> list[str]:
        return [
            "java", f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 256)}m", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            "-cp", cp, main, *args,
        ]

    def start(self, timeout_s: float = 60, *, progress=print) -> "EmbeddedKafka":
        if port_open(self.port):
            raise RuntimeError(
                f"port {self.port} is already in use, so the embedded Apache Kafka cannot listen there. "
                "Stop whatever holds it or set CLMS_KAFKA_PORT to a free port."
            )
        cp = classpath(progress=progress)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.data_dir.resolve()
        # the controller port is remembered beside the log: the quorum voters are part of it
        ctl_file = self.data_dir / "controller.port"
        if not self.controller_port:
            if ctl_file.exists() and not port_open(int(ctl_file.read_text())):
                self.controller_port = int(ctl_file.read_text())
            else:
                self.controller_port = free_port()
        ctl_file.write_text(str(self.controller_port))
        (self.data_dir / "log4j.properties").write_text(LOG4J.format(log=self.log_path))
        props = self.data_dir / "server.properties"
        props.write_text(self._properties())
        if not (self.data_dir / "kraft-logs" / "meta.properties").exists():
            fmt = ["format", f"--cluster-id={_cluster_id(str(self.data_dir))}", "-c", str(props), "--ignore-formatted"]
            if self.secured:
                fmt += ["--add-scram", f"SCRAM-SHA-512=[name={ADMIN_USER},password={self.admin_password}]"]
            done = subprocess.run(self._java("kafka.tools.StorageTool", *fmt, cp=cp),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise RuntimeError(
                    f"Kafka's storage tool could not format {self.data_dir / 'kraft-logs'}: "
                    f"{done.stdout.decode(errors='replace').strip()[-800:]} "
                    "(remove the folder or set CLMS_DATA_DIR to another one)"
                )
        out = open(self.data_dir / "kafka.stdout.log", "ab")
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            self._java("kafka.Kafka", str(props), cp=cp),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        try:
            wait_for(lambda: self._answers() or self.proc.poll() is not None,
                     timeout_s=timeout_s, what=f"Apache Kafka on port {self.port}", interval_s=0.1)
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"Apache Kafka exited with code {self.proc.returncode}; see {self.log_path} and "
                f"{self.data_dir / 'kafka.stdout.log'}"
            )
        return self

    def _answers(self) -> bool:
        """The client listener accepts connections and this run's broker has started (its log
        says so): the port alone opens before the node can serve metadata."""
        if not port_open(self.port):
            return False
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read()
        except FileNotFoundError:
            return False
        return b"Transition from STARTING to STARTED" in text

    def stop(self) -> None:
        _stop_process(self.proc, timeout_s=30)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # --- the secured profile -----------------------------------------------------------------
    def admin_env(self) -> dict[str, str]:
        """Client settings of the super user (operator tools, topic and ACL init)."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": ADMIN_USER,
            "KAFKA_SASL_PASSWORD": self.admin_password,
        }

    def apply_security(self, script: Path, passwords: dict[str, str]) -> str:
        """Run the generated `deploy/kafka/init-security.sh` against this broker, with Kafka's
        own kafka-configs/kafka-acls tools (from the same jars) standing in for /opt/kafka/bin."""
        assert self.secured, "apply_security needs a broker started with secured=True"
        cp = classpath()
        bindir = self.data_dir / "bin"
        bindir.mkdir(exist_ok=True)
        for tool, main in (("kafka-configs.sh", "kafka.admin.ConfigCommand"),
                           ("kafka-acls.sh", "kafka.admin.AclCommand")):
            path = bindir / tool
            # a short-lived command-line tool: start fast, small heap
            java = " ".join(f"'{a}'" for a in [
                "java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto",
                f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}", "-cp", cp, main])
            path.write_text(f"#!/bin/sh\nexec {java} \"$@\"\n")
            path.chmod(0o755)
        env = {**os.environ, "KAFKA_BOOTSTRAP": self.bootstrap, "KAFKA_BIN": str(bindir),
               "KAFKA_ADMIN_PASSWORD": self.admin_password}
        env.update({f"KAFKA_{name.upper()}_PASSWORD": pw for name, pw in passwords.items()})
        done = subprocess.run(["sh", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        text = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            raise RuntimeError(f"{script} failed with code {done.returncode}: {text[-1500:]}")
        return text


if __name__ == "__main__":  # pragma: no cover - manual check: python -m shared.kafka_broker DIR
    k = EmbeddedKafka(free_port(), Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/clms-kafka")).start()
    print("Apache Kafka", k.version, "on", k.bootstrap)
    try:
        k.proc.wait()
    except KeyboardInterrupt:
        k.stop()
