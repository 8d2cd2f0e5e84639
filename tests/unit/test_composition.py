"""Every service's composition root builds without I/O (no broker, no database needed to
construct it), its routes include the operations endpoints, and its metrics register cleanly."""

from __future__ import annotations

import importlib

import pytest

from shared.settings import Settings


@pytest.mark.parametrize("name", ["intake", "referral", "notifications", "analytics", "workspace"])
def test_create_app_builds_without_io(name):
    module = importlib.import_module(f"services.{name}.app")
    app = module.create_app(Settings(_env_file=None))
    paths = set(app.openapi()["paths"])
    assert {"/healthz", "/readyz"} <= paths, paths
    assert "/metrics" not in paths  # not on the public API (nor in its OpenAPI)
    assert importlib.util.find_spec(f"services.{name}.__main__") is not None


async def test_metrics_only_on_the_monitoring_port():
    """The API port answers 404 on /metrics; the monitoring app serves it and nothing else."""
    import httpx

    from services.referral.app import create_app
    from shared.web import monitoring_app

    app = create_app(Settings(_env_file=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        assert (await api.get("/metrics")).status_code == 404
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=monitoring_app(app)),
                                 base_url="http://monitoring") as mon:
        r = await mon.get("/metrics")
        assert r.status_code == 200 and "clms_referral_rules_version" in r.text
        assert (await mon.get("/healthz")).status_code == 404
        assert (await mon.get("/v1/referrals")).status_code == 404


def test_monitoring_ports_default_to_api_port_plus_1000_and_0_turns_them_off():
    s = Settings(_env_file=None)
    assert [s.metrics_port_for(n) for n in ("intake", "referral", "notifications", "analytics")] == \
        [9001, 9002, 9003, 9004]
    assert Settings(_env_file=None, REFERRAL_METRICS_PORT="0").metrics_port_for("referral") == 0
    assert Settings(_env_file=None, ANALYTICS_PORT="8100").metrics_port_for("analytics") == 9100
