"""Test session wiring. The broker and the database are real (see tests/infra.py); every test
that needs them asks for `env`, which gives it its own topics (prefix) and its own database."""

from __future__ import annotations

import uuid

import pytest

from shared.kafka import ensure_topics
from tests.infra import Infra, create_database, drop_database, start_infra


@pytest.fixture(scope="session")
def infra(request):
    infra: Infra = start_infra()
    line = f"[infra] {infra.kind}: broker {infra.describe()} at {infra.bootstrap}, postgres={infra.admin_db_url}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # shown in the run's log even with -q and output capture
        reporter.write_line("")
        reporter.write_line(line)
    else:
        print(line, flush=True)
    yield infra
    infra.close()


@pytest.fixture
async def env(infra: Infra):
    """Settings for one test: unique topic prefix (topics declared), fresh database."""
    db_url = await create_database(infra)
    settings = infra.settings(db_url=db_url, prefix=f"t{uuid.uuid4().hex[:10]}.")
    await ensure_topics(settings)
    yield settings
    await drop_database(infra, db_url)
