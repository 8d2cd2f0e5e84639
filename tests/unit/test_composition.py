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
    assert {"/healthz", "/readyz", "/metrics"} <= paths, paths
    assert importlib.util.find_spec(f"services.{name}.__main__") is not None
