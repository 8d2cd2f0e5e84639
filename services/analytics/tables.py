"""The faust tables of the analytics service, declared in one place.

One table, `analytics-cases`: case id -> `CaseState` (orjson bytes), changelog-backed
(`<group>-analytics-cases-changelog`, 6 partitions like the source topics). Events are keyed by
case id, and faust writes a table change to the changelog partition of the event being
processed, so a case's state, its source events and its changelog record share one partition
number and a restarted or rebalanced worker recovers exactly the cases of its partitions.

The counters are not a second table: they are the sum of every case's `contributions` (see
`rules.py`), kept in memory and rebuilt from this table after each recovery. So one event is
one changelog record, and "counted" and "remembered as counted" can never disagree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import faust

from shared.topics import PARTITIONS

CASES_TABLE = "analytics-cases"


def declare_tables(app: faust.App, *, on_changelog_event: Callable[[Any], Awaitable[None]] | None = None) -> faust.Table:
    """`on_changelog_event` sees every changelog record read while recovering (its partition)."""
    return app.Table(
        CASES_TABLE,
        default=None,
        partitions=PARTITIONS,
        key_type=bytes,
        value_type=bytes,
        on_changelog_event=on_changelog_event,
        help="analytics: per-case state (seen event ids, stages reached, referrals)",
    )
