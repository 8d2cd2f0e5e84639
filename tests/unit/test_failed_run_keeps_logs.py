"""A failing run says which test failed and keeps the logs of the system it ran (tests/conftest.py)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_test_is_named_and_the_logs_of_its_system_are_kept(pytester, monkeypatch, tmp_path):
    label = f"sys-{uuid.uuid4().hex[:8]}"
    system = tmp_path / label
    (system / "logs").mkdir(parents=True)
    (system / "logs" / "referral.log").write_text("referral worker: stopped\n")
    (system / "kafka" / "kraft-logs").mkdir(parents=True)
    (system / "kafka" / "kraft-logs" / "00000.log").write_bytes(b"\0segment")  # broker data, not a log to keep
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport, pytest_terminal_summary\n")
    pytester.makepyfile(f"""
        from pathlib import Path
        from tests.infra import LIVE_SYSTEMS

        def test_something_that_breaks():
            LIVE_SYSTEMS[{label!r}] = Path({str(system)!r})
            assert 2 + 2 == 5, "the sum is off"

        def test_fine():
            LIVE_SYSTEMS.pop({label!r})
    """)
    result = pytester.runpytest_subprocess("-q", "-ra")
    kept = ROOT / "tests" / "artifacts" / "logs" / f"test_something_that_breaks-{label}"
    try:
        result.assert_outcomes(failed=1, passed=1)
        result.stdout.fnmatch_lines([
            f"[[]logs[]] *::test_something_that_breaks failed (call): 1 log file(s) kept in {kept}",
            "FAILED *::test_something_that_breaks*"])
        assert (kept / "logs" / "referral.log").read_text() == "referral worker: stopped\n"
        assert not (kept / "kafka").exists()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
