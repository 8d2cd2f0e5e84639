"""shared.streams.is_transient: which handler errors a worker retries (the partition waits) and
which it dead-letters. A transient error dead-lettered loses a valid event (a case never
referred); a bad event retried blocks its partition."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from asyncpg.exceptions import InternalClientError

from shared.errors import Invalid
from shared.streams import is_transient


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError("connect call failed"),
    asyncio.TimeoutError(),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.InterfaceError("connection is closed"),
    # seen in tests/reliability/test_postgres_outage.py: a pooled connection left mid-operation
    # when PostgreSQL stopped; it had been dead-lettered and its case was never referred
    InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
])
def test_a_database_or_broker_briefly_away_is_retried(exc: BaseException):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ValueError("bad municipality"),
    KeyError("reported_by"),
    Invalid("categories: unknown category"),
    asyncpg.exceptions.NotNullViolationError("null value in column"),
    asyncpg.exceptions.StringDataRightTruncationError("value too long"),
])
def test_a_bad_event_is_not_retried(exc: BaseException):
    assert not is_transient(exc)
