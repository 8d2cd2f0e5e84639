"""`python -m services.notifications.delivery` as a real process for tests: the delivery of a
test's database and topics, sending to a test's `Sink`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from services.notifications.sink import Sink
from shared.embedded import free_port
from shared.settings import Settings
from tests.infra import wait_until


class DeliveryProcess:
    def __init__(self, settings: Settings, sink: Sink, **env: object):
        self.port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="clms-delivery-", suffix=".log")[1])
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
            "DATABASE_URL": settings.database_url or "",
            "CLMS_TOPIC_PREFIX": settings.topic_prefix,
            "CLMS_ENV": "test",
            "CLMS_BROKER_KIND": settings.kafka_broker_kind,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink.smtp_port),
            "SMS_WEBHOOK_URL": f"http://127.0.0.1:{sink.http_port}/sms",
            "WEBHOOK_SECRET": settings.webhook_secret.get_secret_value(),
            "NOTIFICATIONS_DELIVERY_PORT": str(self.port),
            "NOTIFICATIONS_DELIVERY_METRICS_PORT": "0",
            "LOG_JSON": "false",
            "LOG_LEVEL": "INFO",
            **{k: str(v) for k, v in env.items()},
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DeliveryProcess":
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.notifications.delivery"],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    async def ready(self, timeout_s: float = 60) -> None:
        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the delivery process exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False
        await wait_until(answers, timeout_s=timeout_s, what="the delivery process's /readyz", interval_s=0.2)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, sig: int | None = None) -> int:
        """Send `sig` (default SIGTERM) and wait for the process to end; its exit code."""
        import signal

        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextlib.asynccontextmanager
async def delivery_process(settings: Settings, sink: Sink, **env: object) -> AsyncIterator[DeliveryProcess]:
    proc = DeliveryProcess(settings, sink, **env).start()
    try:
        await proc.ready()
        yield proc
    finally:
        proc.stop()
        proc.log.unlink(missing_ok=True)
