"""Where the notifications service's e-mail/SMS delivery runs (issue 18): in every deployment
the API/worker process runs with NOTIFY_DELIVERY_IN_PROCESS=false and the delivery process
(`python -m services.notifications.delivery`) runs beside it, with what it needs to send."""

from __future__ import annotations

from pathlib import Path

import yaml

from clms.dev import COMPANIONS
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_clms_dev_starts_the_delivery_process_beside_notifications():
    assert COMPANIONS == {"notifications-delivery": ("notifications", "services.notifications.delivery")}


def test_compose_runs_delivery_in_its_own_container_and_not_in_notifications():
    assert COMPOSE["notifications"]["environment"]["NOTIFY_DELIVERY_IN_PROCESS"] == "false"
    d = COMPOSE["notifications-delivery"]
    assert d["entrypoint"] == ["python", "-m", "services.notifications.delivery"]
    env = d["environment"]
    assert env["SMTP_HOST"] == COMPOSE["notifications"]["environment"]["SMTP_HOST"]
    assert env["KAFKA_SASL_USERNAME"] == "notifications"  # dead letters, as the service
    assert env["DATABASE_URL"] == COMPOSE["notifications"]["environment"]["DATABASE_URL"]
    assert "DATABASE_MIGRATION_URL" not in env  # notifications migrates; delivery waits for it
    assert d["depends_on"]["notifications"] == {"condition": "service_healthy"}
    s = Settings(_env_file=None, NOTIFICATIONS_DELIVERY_PORT=env["NOTIFICATIONS_DELIVERY_PORT"],
                 NOTIFICATIONS_DELIVERY_METRICS_PORT=env["NOTIFICATIONS_DELIVERY_METRICS_PORT"])
    assert f":{s.notifications_delivery_port}/healthz" in " ".join(d["healthcheck"]["test"])
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert f"notifications-delivery:{s.metrics_port_for('notifications_delivery')}" in targets


def test_alone_the_service_still_delivers():
    """`python -m services.notifications` with no setting: one process does everything."""
    assert Settings(_env_file=None).notify_delivery_in_process is True
