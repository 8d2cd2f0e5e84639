"""Retention windows are refused when a consumer could see an event again after its dedupe row
is gone (Settings._retention_windows_are_safe)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings


def settings(**env: object) -> Settings:
    return Settings(_env_file=None, **{k: str(v) for k, v in env.items()})  # type: ignore[arg-type]


def test_defaults_keep_published_outbox_rows_7_days_and_dedupe_rows_8_days():
    s = settings()
    assert (s.outbox_retention_hours, s.inbox_retention_hours) == (168, 192)
    assert (s.retention_batch_size, s.retention_interval_s) == (1000, 3600)


def test_the_inbox_must_outlast_the_outbox_by_an_hour():
    with pytest.raises(ValidationError, match=r"INBOX_RETENTION_HOURS \(168\) must be at least OUTBOX_RETENTION_HOURS "
                                              r"\(168\) \+ 1.*set INBOX_RETENTION_HOURS=169"):
        settings(OUTBOX_RETENTION_HOURS=168, INBOX_RETENTION_HOURS=168)
    assert settings(OUTBOX_RETENTION_HOURS=168, INBOX_RETENTION_HOURS=169).inbox_retention_hours == 169


def test_an_outbox_kept_forever_needs_an_inbox_kept_forever():
    with pytest.raises(ValidationError, match="INBOX_RETENTION_HOURS must be 0"):
        settings(OUTBOX_RETENTION_HOURS=0)
    assert settings(OUTBOX_RETENTION_HOURS=0, INBOX_RETENTION_HOURS=0).inbox_retention_hours == 0
    assert settings(INBOX_RETENTION_HOURS=0).outbox_retention_hours == 168  # inbox forever: always safe


def test_a_known_topic_retention_must_be_shorter_than_the_inbox_window():
    with pytest.raises(ValidationError, match=r"longer than the broker's topic retention \(KAFKA_TOPIC_RETENTION_HOURS=192\)"):
        settings(KAFKA_TOPIC_RETENTION_HOURS=192)
    assert settings(KAFKA_TOPIC_RETENTION_HOURS=168).kafka_topic_retention_hours == 168


def test_negative_windows_are_refused():
    with pytest.raises(ValidationError, match="OUTBOX_RETENTION_HOURS"):
        settings(OUTBOX_RETENTION_HOURS=-1)
