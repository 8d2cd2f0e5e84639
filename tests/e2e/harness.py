"""The whole system for end-to-end and reliability tests, started by the same supervisor
`make run` uses (`clms.dev.Supervisor`): embedded broker and PostgreSQL, the SMTP sink, and
every service as a separate `python -m services.<name>` process on free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from clms.dev import SERVICES, Supervisor
from shared.auth import mint_token
from shared.embedded import free_port
from shared.settings import Settings
from tests.infra import LIVE_SYSTEMS, keep_logs


@dataclass
class System:
    sup: Supervisor
    settings: Settings  # the broker and database the services use

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{getattr(self.settings, f'{service}_port')}"

    def metrics_url(self, service: str) -> str:
        """The service's monitoring port: `{metrics_url}/metrics` (the API port answers 404)."""
        return f"http://127.0.0.1:{self.settings.metrics_port_for(service)}"

    @property
    def mail_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.smtp_sink_http_port}"

    def headers(self, *, sub: str, agency: str, municipality: str, roles: list[str]) -> dict[str, str]:
        token = mint_token(self.settings, sub=sub, agency=agency, municipality=municipality, roles=roles)
        return {"Authorization": f"Bearer {token}"}

    def kill(self, service: str, sig: int = signal.SIGKILL) -> int:
        child = self.sup.child(service)
        os.kill(child.proc.pid, sig)
        child.proc.wait(30)
        return child.proc.pid

    def restart(self, service: str, *, wait: bool = True) -> None:
        self.sup.start_service(service)
        if wait:
            self.sup.wait_ready(only=service)

    def log(self, service: str) -> str:
        path = self.sup.log_dir / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def running_system(data_dir: Path | None = None, *, services: tuple[str, ...] = SERVICES,
                         extra_env: dict[str, str] | None = None,
                         service_env: dict[str, dict[str, str]] | None = None) -> AsyncIterator[System]:
    # Not under pytest's tmp folder: a pytest session starting elsewhere resets its permissions to
    # 0700, which locks out the unprivileged user PostgreSQL runs as when tests run as root.
    own_dir = Path(tempfile.mkdtemp(prefix="clms-sys-"))
    data_dir = own_dir / (data_dir.name if data_dir else "data")
    ports = {
        "CLMS_KAFKA_PORT": free_port(), "CLMS_POSTGRES_PORT": free_port(),
        "CLMS_SMTP_SINK_PORT": free_port(), "CLMS_SMTP_SINK_HTTP_PORT": free_port(),
        "INTAKE_PORT": free_port(), "REFERRAL_PORT": free_port(),
        "NOTIFICATIONS_PORT": free_port(), "ANALYTICS_PORT": free_port(), "WORKSPACE_PORT": free_port(),
        "INTAKE_METRICS_PORT": free_port(), "REFERRAL_METRICS_PORT": free_port(),
        "NOTIFICATIONS_METRICS_PORT": free_port(), "ANALYTICS_METRICS_PORT": free_port(),
        "NOTIFICATIONS_DELIVERY_PORT": free_port(), "NOTIFICATIONS_DELIVERY_METRICS_PORT": free_port(),
        "WORKSPACE_METRICS_PORT": free_port(),  # else WORKSPACE_PORT + 1000: the ephemeral range
    }
    env = {k: str(v) for k, v in ports.items()}
    env.update({"CLMS_DATA_DIR": str(data_dir), "CLMS_TOPIC_PREFIX": "", "CLMS_ENV": "test",
                "LOG_JSON": "true", "LOG_LEVEL": "INFO", "KAFKA_REBALANCE_TIMEOUT_S": "2",
                "KAFKA_SESSION_TIMEOUT_S": "6"})
    env.update(extra_env or {})
    settings = Settings(_env_file=None, **env)  # type: ignore[call-arg]
    sup = Supervisor(settings, services=services)
    for k in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "SMTP_HOST", "SMTP_PORT"):
        sup.env.pop(k, None)
    sup.env.update(env)
    sup.service_env.update(service_env or {})
    LIVE_SYSTEMS[own_dir.name] = own_dir  # a failing test keeps its logs (tests/conftest.py)
    try:
        sup.start_infrastructure()
        await sup.prepare()
        sup.start_services()
        sup.wait_ready(timeout_s=120)
        yield System(sup, sup.settings)
    except BaseException as exc:
        # keep the services' logs of a failed run where CI and people can read them
        with contextlib.suppress(OSError):
            keep_logs(own_dir, own_dir.name, f"the system in {own_dir} failed ({type(exc).__name__})")
        raise
    finally:
        LIVE_SYSTEMS.pop(own_dir.name, None)
        sup.stop()
        shutil.rmtree(own_dir, ignore_errors=True)


async def get_json(client: httpx.AsyncClient, url: str, **kw) -> object:
    r = await client.get(url, **kw)
    r.raise_for_status()
    return r.json()
