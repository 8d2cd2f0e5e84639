"""What the referral use cases need, built once in `create_app` and handed to the routes (through
`DepsDep`) and to the worker and the deadline scanner (as an argument)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from services.referral.rules import RuleSet

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Deps:
    """The pool, the routing rules, the clock (tests move it), and what a use case tells the rest
    of the process: wake the outbox relay, count in the metrics."""

    pool: asyncpg.Pool
    rules: RuleSet
    clock: Clock = utcnow
    wake_relay: Callable[[], None] = lambda: None
    on_opened: Callable[[str, str], None] = lambda agency, priority: None
    on_overdue: Callable[[str], None] = lambda agency: None
    on_action: Callable[[str], None] = lambda action: None


def _deps(request: Request) -> Deps:
    return request.app.state.deps


DepsDep = Annotated[Deps, Depends(_deps)]
