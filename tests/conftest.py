"""Test session wiring. The broker and the database are real (see tests/infra.py); every test
that needs them asks for `env`, which gives it its own topics (prefix) and its own database."""

from __future__ import annotations

import uuid

import pytest

from shared.kafka import ensure_topics
from tests.infra import KEPT_LOGS, LIVE_SYSTEMS, Infra, create_database, drop_database, keep_logs, start_infra


pytest_plugins = ["pytester"]  # tests/unit/test_failed_run_keeps_logs.py runs a failing session

INFRA_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in INFRA_LINES + KEPT_LOGS:
        terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails keeps the logs of every whole system running at that moment (the e2e and
    reliability tests' services, broker and database), named in the run's closing summary."""
    report = yield
    if report.failed:
        for label, folder in list(LIVE_SYSTEMS.items()):
            keep_logs(folder, f"{item.name}-{label}", f"{item.nodeid} failed ({report.when})")
    return report


@pytest.fixture(scope="session")
def infra(request):
    infra: Infra = start_infra()
    line = f"[infra] {infra.kind}: broker {infra.describe()} at {infra.bootstrap}, postgres={infra.admin_db_url}"
    INFRA_LINES.append(line)  # repeated in the run's closing summary
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:  # shown in the run's log even with -q and output capture
        with capture.global_and_fixture_disabled():
            print("\n" + line, flush=True)
    else:
        print(line, flush=True)
    yield infra
    if request.session.testsfailed and infra.data_dir is not None:  # the broker's and PostgreSQL's logs
        keep_logs(infra.data_dir, f"infra-{infra.data_dir.name}", "tests failed; the embedded broker and database")
    infra.close()


async def _fresh_settings(infra: Infra) -> tuple:
    db_url = await create_database(infra)
    settings = infra.settings(db_url=db_url, prefix=f"t{uuid.uuid4().hex[:10]}.")
    await ensure_topics(settings)
    return settings, db_url


@pytest.fixture
async def env(infra: Infra):
    """Settings for one test: unique topic prefix (topics declared), fresh database."""
    settings, db_url = await _fresh_settings(infra)
    yield settings
    await drop_database(infra, db_url)


@pytest.fixture(scope="module")
async def module_env(infra: Infra):
    """`env` for a whole module, for tests that read one scene set up once by a module fixture."""
    settings, db_url = await _fresh_settings(infra)
    yield settings
    await drop_database(infra, db_url)
