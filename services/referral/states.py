"""The referral state machine. Pure: values in, values out.

    pending --acknowledge--> acknowledged --accept--> accepted --complete--> completed
                                          \\--decline--> declined   (terminal; escalated)
    pending | acknowledged | accepted --close--> closed            (the case closed)

Overdue is not a state: a referral is overdue when, at its deadline, it is still waiting for
an answer (pending, or acknowledged but neither accepted nor declined). The flag and the
escalation are recorded next to the status, once.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from shared.errors import Conflict
from shared.events import ReferralStatus as S


class Action(StrEnum):
    acknowledge = "acknowledge"
    accept = "accept"
    decline = "decline"
    complete = "complete"
    close = "close"


TRANSITIONS: dict[tuple[S, Action], S] = {
    (S.pending, Action.acknowledge): S.acknowledged,
    (S.acknowledged, Action.accept): S.accepted,
    (S.acknowledged, Action.decline): S.declined,
    (S.accepted, Action.complete): S.completed,
    (S.pending, Action.close): S.closed,
    (S.acknowledged, Action.close): S.closed,
    (S.accepted, Action.close): S.closed,
}

# Waiting for the receiving agency's answer: these become overdue at the deadline.
AWAITING_ANSWER: frozenset[S] = frozenset({S.pending, S.acknowledged})
OPEN: frozenset[S] = frozenset({S.pending, S.acknowledged, S.accepted})
TERMINAL: frozenset[S] = frozenset({S.declined, S.completed, S.closed})


class IllegalTransition(Conflict):
    """A 409 whose detail names the current status: `{"message": ..., "current_status": ...}`."""

    def __init__(self, current: S, action: Action):
        self.current = current
        self.action = action
        allowed = sorted(a.value for (s, a) in TRANSITIONS if s is current and a is not Action.close)
        hint = f"; from {current.value} you may {' or '.join(allowed)}" if allowed else (
            f"; {current.value} is final")
        message = f"cannot {action.value} a referral that is {current.value}{hint}"
        super().__init__(message, detail={"message": message, "current_status": current.value})


def next_status(current: S | str, action: Action | str) -> S:
    """The status after `action`, or `IllegalTransition` naming the current status."""
    cur, act = S(current), Action(action)
    try:
        return TRANSITIONS[(cur, act)]
    except KeyError:
        raise IllegalTransition(cur, act) from None


def legal_actions(current: S | str) -> list[Action]:
    cur = S(current)
    return [a for (s, a) in TRANSITIONS if s is cur]


def is_overdue(status: S | str, deadline: datetime, now: datetime) -> bool:
    """Still waiting for an answer at (or after) the deadline."""
    return S(status) in AWAITING_ANSWER and now >= deadline


def within_deadline(deadline: datetime, now: datetime) -> bool:
    return now <= deadline
