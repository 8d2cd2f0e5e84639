"""Who gets what, on which channel, and when to try again: the notification rules as pure
functions (no FastAPI, faust, asyncpg or aiokafka import).

No I/O: the service asks the directory for the officers an `Audience` names, `recipients()`
picks them out, then `plan()` turns the event and those officers into notifications with
deterministic ids.

| event                                    | audience                                               |
|------------------------------------------|--------------------------------------------------------|
| referral.created                         | on-duty officers of the receiving office (none on duty: its supervisor) |
| referral.overdue, referral.escalated     | the office supervisor and the municipal coordinator    |
| referral.declined                        | the municipal coordinator                              |
| referral.acknowledged/accepted/completed | the officer who reported the case (`reported_by`)      |
| re-alert (created, unacknowledged)       | the office supervisor                                  |
| referral.closed (the case was closed)    | on-duty officers of the office and its supervisor      |

Channels: in-app always (when the officer has it); e-mail when the officer has an address;
SMS (costly, intrusive) only for time-critical events: an urgent or high-priority new
referral, an overdue or escalated referral, a re-alert.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

# Namespace of notification ids: uuid5(NS, f"{event_id}|{recipient}|{channel}").
NOTIFICATION_NS = uuid.UUID("6f1c0a52-3b7e-5d2a-9c41-0a7e2d9b8c11")

REALERT = "referral.realert"  # template / event_type of the re-alert to the supervisor

CREATED = "referral.created"
TO_REPORTER = frozenset({"referral.acknowledged", "referral.accepted", "referral.completed"})
TO_SUPERVISOR_AND_COORDINATOR = frozenset({"referral.overdue", "referral.escalated"})
TO_COORDINATOR = frozenset({"referral.declined"})
# The case was closed and the office's open referral with it: the office must know to stop.
TO_OFFICE = frozenset({"referral.closed"})
# Events that show the office has seen the referral: no re-alert after these.
HANDLED = frozenset({"referral.acknowledged", "referral.accepted", "referral.declined",
                     "referral.completed", "referral.closed"})
SMS_WORTHY = frozenset({"referral.overdue", "referral.escalated", REALERT})
TEMPLATED = frozenset({CREATED, *TO_REPORTER, *TO_SUPERVISOR_AND_COORDINATOR, *TO_COORDINATOR, *TO_OFFICE,
                       REALERT})

AudienceKind = Literal["office_on_duty", "office_supervisor", "coordinator", "officer"]


@dataclass(frozen=True, slots=True)
class Audience:
    """A group of officers to look up in the directory."""

    kind: AudienceKind
    key: str  # office id, municipality slug or officer subject


@dataclass(frozen=True, slots=True)
class Contact:
    """The directory entry of one officer, as the policy needs it."""

    officer_id: str
    role: str
    language: str
    email: bool
    phone: bool
    inapp: bool
    on_duty: bool
    office_id: str = ""


@dataclass(frozen=True, slots=True)
class Planned:
    notification_id: uuid.UUID
    recipient: str
    channel: str  # email | sms | inapp
    language: str


def notification_id(event_id: uuid.UUID | str, recipient: str, channel: str) -> uuid.UUID:
    """One id per (event, recipient, channel): a redelivered event maps to the same ids."""
    return uuid.uuid5(NOTIFICATION_NS, f"{event_id}|{recipient}|{channel}")


def realert_event_id(created_event_id: uuid.UUID | str) -> uuid.UUID:
    """The derived cause id of the one re-alert of a referral.created event."""
    return uuid.uuid5(NOTIFICATION_NS, f"realert|{created_event_id}")


def audiences(event_type: str, *, office_id: str, municipality: str, reported_by: str | None,
              escalated_to: str | None = None) -> list[Audience]:
    """Who an event is for, before the directory is consulted."""
    coordinator = escalated_to or f"coordinator.{municipality}"
    if event_type == CREATED:
        return [Audience("office_on_duty", office_id)]
    if event_type == REALERT:
        return [Audience("office_supervisor", office_id)]
    if event_type in TO_SUPERVISOR_AND_COORDINATOR:
        return [Audience("office_supervisor", office_id), Audience("officer", coordinator)]
    if event_type in TO_COORDINATOR:
        return [Audience("officer", coordinator)]
    if event_type in TO_OFFICE:
        return [Audience("office_on_duty", office_id), Audience("office_supervisor", office_id)]
    if event_type in TO_REPORTER:
        return [Audience("officer", reported_by)] if reported_by else []
    return []


def select(audience: Audience, officers: list[Contact]) -> list[Contact]:
    """The officers of the directory slice `officers` that belong to `audience`."""
    if audience.kind == "office_on_duty":
        mine = [o for o in officers if o.office_id == audience.key]
        on_duty = [o for o in mine if o.on_duty and o.role != "coordinator"]
        # Nobody on duty must not mean nobody alerted: fall back to the office supervisor.
        return on_duty or [o for o in mine if o.role == "supervisor"]
    if audience.kind == "office_supervisor":
        return [o for o in officers if o.office_id == audience.key and o.role == "supervisor"]
    return [o for o in officers if o.officer_id == audience.key]


def recipients(audiences: list[Audience], directory: list[Contact], *, fallback_language: str) -> list[Contact]:
    """The officers of each audience among `directory` (a slice that holds every one of them);
    someone an event names who is not in the directory still gets the in-app alert."""
    out: list[Contact] = []
    for a in audiences:
        found = select(a, directory)
        if not found and a.kind == "officer":
            found = [unknown_officer(a.key, fallback_language)]
        out.extend(found)
    return out


def channels(contact: Contact, *, event_type: str, priority: str | None = None) -> list[str]:
    out = []
    if contact.inapp:
        out.append("inapp")
    if contact.email:
        out.append("email")
    if contact.phone and (event_type in SMS_WORTHY or (event_type == CREATED and priority in ("urgent", "high"))):
        out.append("sms")
    return out


def unknown_officer(subject: str, default_language: str) -> Contact:
    """Someone named by an event but absent from the directory (e.g. a reporter from another
    system): the in-app inbox still works for their token, so alert them there."""
    return Contact(officer_id=subject, role="duty_officer", language=default_language,
                   email=False, phone=False, inapp=True, on_duty=False)


def plan(event_id: uuid.UUID | str, event_type: str, recipients: list[Contact], *,
         priority: str | None = None) -> list[Planned]:
    """One notification per recipient and channel, deduplicated, with deterministic ids."""
    seen: set[tuple[str, str]] = set()
    out: list[Planned] = []
    for c in recipients:
        for ch in channels(c, event_type=event_type, priority=priority):
            if (c.officer_id, ch) in seen:
                continue
            seen.add((c.officer_id, ch))
            out.append(Planned(notification_id(event_id, c.officer_id, ch), c.officer_id, ch, c.language))
    return out


def backoff_s(attempt: int, *, base_s: float, max_s: float, jitter: float) -> float:
    """Delay before attempt `attempt + 1` after `attempt` failures: exponential with
    "equal jitter" (half fixed, half random; `jitter` in [0, 1) supplied by the caller)."""
    ceiling = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    return ceiling / 2 + (ceiling / 2) * jitter


DUE_MARGIN_S = 0.01  # wake this much after a due time, so the database's clock sees it due too
BUSY_PAUSE_S = 0.05  # a row due but not claimed (another replica's row lock): look again after this


def sleep_until_due(due_in_s: float | None, *, cap_s: float) -> float:
    """How long a loop that acts on due rows (deliveries, re-alerts) sleeps: until the earliest
    falls due, at most `cap_s` (a safety net, also with nothing due at all: None); a short pause,
    never zero, when one is due already but was not taken (so the loop cannot spin)."""
    if due_in_s is None:
        return cap_s
    return min(cap_s, max(BUSY_PAUSE_S, due_in_s + DUE_MARGIN_S))
