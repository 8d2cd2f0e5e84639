"""The counting rules of the analytics service: pure functions, no I/O (no faust, fastapi,
aiokafka or asyncpg import), unit-tested in `tests/unit/test_analytics_counting.py`.

How counting works (and why it is idempotent and order-tolerant)
-----------------------------------------------------------------
Every event is keyed by its case id, so all events of one case reach the same partition. The
worker keeps one small `CaseState` per case (a faust table keyed by case id, so it
co-partitions with the source topics and its changelog). `apply_event(state, envelope)` folds
one event into that state; the state remembers the ids of the events already applied, so a
redelivered event changes nothing (`applied=False`).

The counters are not stored as separate increments: `contributions(state)` says which counter
keys this case adds 1 (or n) to, as a pure function of the case state. When an event changes
a case, the aggregate is adjusted by `contributions(new) - contributions(old)`. Three
properties follow:

- one event = one table write (the case state, seen-set included), so a crash between "counted"
  and "remembered as counted" cannot happen: both are the same changelog record;
- events of one case that arrive out of order across topics (a `referral.created` folded before
  its `case.identified`) still end up counted under the right municipality and month, because the
  contribution is recomputed from the whole state;
- rebuilding the aggregate from the table (after recovery or a rebalance) is a sum of
  `contributions` over the cases, the same numbers the live path produced.

`counter_deltas(old, new)` is therefore the answer to "given this event, which counter keys move
and by how much".
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from shared import events as ev

# --- vocabulary of the counters --------------------------------------------------------------

FUNNEL_STAGES: tuple[str, ...] = (
    "identified",
    "referred",
    "acknowledged_in_time",
    "accepted",
    "completed",
    "withdrawn",
    "school_enrolled",
)

# Breakdown dimensions of identifications, each with every value it can take (so zeros show).
BREAKDOWNS: dict[str, tuple[str, ...]] = {
    "reporter_agency": tuple(a.value for a in ev.AgencyType if a is not ev.AgencyType.coordinator),
    "sector": tuple(s.value for s in ev.Sector),
    "sex": tuple(s.value for s in ev.Sex),
    "age_band": tuple(a.value for a in ev.AgeBand),
    "community": tuple(c.value for c in ev.Community),
    "hazardous": ("true", "false"),
    "worst_form": ("true", "false"),
}

REFERRAL_AGENCIES: tuple[str, ...] = tuple(
    a.value for a in ev.AgencyType if a not in (ev.AgencyType.coordinator, ev.AgencyType.ngo)
)

TERMINAL = frozenset({ev.ReferralStatus.declined.value, ev.ReferralStatus.completed.value,
                      ev.ReferralStatus.closed.value})

UNKNOWN_MONTH = "unknown"

# Counter keys (tuples):
#   ("id", municipality, month, dimension, value)  identifications; dimension "total" has value ""
#   ("fn", municipality, month, stage)             funnel stage reached by a case identified that month
#   ("ref", municipality, agency, "open"|"overdue") referrals open / overdue now
#   ("nt", channel, "sent"|"failed"|"acknowledged") notifications (operations view)
Key = tuple[str, ...]


def month_of(d: Any) -> str:
    return f"{d.year:04d}-{d.month:02d}"


# --- per-case state --------------------------------------------------------------------------


@dataclass
class ReferralState:
    agency: str
    municipality: str
    status: str = ev.ReferralStatus.pending.value
    created_at: float | None = None  # epoch seconds of the referral.created envelope
    ack_seconds: float | None = None  # created -> acknowledged
    acked_at: float | None = None  # epoch seconds of the first referral.acknowledged envelope
    ack_in_time: bool = False
    accepted: bool = False
    completed: bool = False
    overdue: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.agency, "m": self.municipality, "s": self.status, "c": self.created_at,
                "k": self.ack_seconds, "ka": self.acked_at, "t": self.ack_in_time, "ac": self.accepted,
                "cp": self.completed, "o": self.overdue}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReferralState":
        return cls(agency=d["a"], municipality=d["m"], status=d["s"], created_at=d["c"],
                   ack_seconds=d["k"], acked_at=d.get("ka"), ack_in_time=d["t"], accepted=d["ac"],
                   completed=d["cp"], overdue=d["o"])


@dataclass
class CaseState:
    municipality: str | None = None
    month: str | None = None  # month of identification (identified_on)
    first_month: str | None = None  # month of the first event seen, if identification not (yet) seen
    identification: dict[str, str] | None = None  # breakdown dimension -> value
    withdrawn: bool = False
    enrolled: bool = False
    closed: bool = False
    referrals: dict[str, ReferralState] = field(default_factory=dict)
    notifications: dict[str, int] = field(default_factory=dict)  # "channel|kind" -> n
    seen: list[str] = field(default_factory=list)  # ids of applied events (hex, no dashes)

    def to_bytes(self) -> bytes:
        # orjson (3.13) leaves each result in a ~4 kB allocation; a state is ~300 bytes and a
        # worker or the rebuild tool keeps hundreds of thousands of them: keep an exact-size copy
        return bytes(memoryview(orjson.dumps({
            "mu": self.municipality, "mo": self.month, "fm": self.first_month,
            "id": self.identification, "w": self.withdrawn, "e": self.enrolled, "c": self.closed,
            "r": {k: v.to_dict() for k, v in self.referrals.items()},
            "n": self.notifications, "s": self.seen,
        })))

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> "CaseState":
        if not raw:
            return cls()
        d = orjson.loads(raw)
        return cls(municipality=d["mu"], month=d["mo"], first_month=d["fm"], identification=d["id"],
                   withdrawn=d["w"], enrolled=d["e"], closed=d["c"],
                   referrals={k: ReferralState.from_dict(v) for k, v in d["r"].items()},
                   notifications=dict(d["n"]), seen=list(d["s"]))

    def copy(self) -> "CaseState":
        return CaseState(
            municipality=self.municipality, month=self.month, first_month=self.first_month,
            identification=dict(self.identification) if self.identification is not None else None,
            withdrawn=self.withdrawn, enrolled=self.enrolled, closed=self.closed,
            referrals={k: replace(v) for k, v in self.referrals.items()},
            notifications=dict(self.notifications), seen=list(self.seen),
        )


def _ts(t: datetime) -> float:
    return t.timestamp()


def _time_to_acknowledge(ref: ReferralState) -> None:
    """Seconds from creation to the first acknowledgement, once both are known, whichever of the
    two events was folded first (a redelivery after a rebalance can bring them in either order)."""
    if ref.ack_seconds is None and ref.created_at is not None and ref.acked_at is not None:
        ref.ack_seconds = max(0.0, ref.acked_at - ref.created_at)


def apply_event(state: CaseState, envelope: ev.Envelope) -> tuple[CaseState, bool]:
    """Fold one event into a copy of the case state. Returns (new state, applied?); an event
    whose id was already applied returns the state unchanged and False."""
    eid = envelope.id.hex
    if eid in state.seen:
        return state, False
    new = state.copy()
    new.seen.append(eid)
    data = envelope.data
    muni = getattr(data, "municipality", None)
    if new.municipality is None and muni:
        new.municipality = muni
    if new.first_month is None:
        new.first_month = month_of(envelope.time)

    if isinstance(data, ev.CaseIdentified):
        new.municipality = data.municipality  # the identification is the authority
        new.month = data.month  # identified_month (identified_on in older records)
        new.identification = {
            "reporter_agency": data.reporter_agency.value,
            "sector": data.sector.value,
            "sex": data.sex.value,
            "age_band": data.age_band.value,
            "community": data.community.value,
            "hazardous": "true" if data.hazardous else "false",
            "worst_form": "true" if data.worst_form else "false",
        }
    elif isinstance(data, ev.CaseUpdated):
        if new.identification is not None:
            if data.sector is not None:
                new.identification["sector"] = data.sector.value
            if data.hazardous is not None:
                new.identification["hazardous"] = "true" if data.hazardous else "false"
    elif isinstance(data, ev.CaseChildWithdrawn):
        new.withdrawn = True
    elif isinstance(data, ev.CaseSchoolEnrolled):
        new.enrolled = True
    elif isinstance(data, ev.CaseClosed):
        new.closed = True
        for r in new.referrals.values():  # open referrals of a closed case are closed with it
            if r.status not in TERMINAL:
                r.status = ev.ReferralStatus.closed.value
                r.overdue = False
    elif isinstance(data, (ev.ReferralCreated, ev.ReferralActed, ev.ReferralOverdue, ev.ReferralEscalated)):
        rid = data.referral_id.hex
        ref = new.referrals.get(rid)
        if ref is None:
            ref = new.referrals[rid] = ReferralState(agency=data.agency.value,
                                                     municipality=data.municipality)
        if isinstance(data, ev.ReferralCreated):
            ref.created_at = _ts(envelope.time)
            _time_to_acknowledge(ref)  # the acknowledgement may have come first
            if new.closed and ref.status not in TERMINAL:
                ref.status = ev.ReferralStatus.closed.value
        elif isinstance(data, ev.ReferralActed):
            ref.status = data.to_status.value
            ref.overdue = False  # answered: the next deadline, if any, comes as a new referral.overdue
            if isinstance(data, ev.ReferralAcknowledged):
                ref.ack_in_time = ref.ack_in_time or data.within_deadline
                if ref.acked_at is None:
                    ref.acked_at = _ts(envelope.time)
                _time_to_acknowledge(ref)
            if isinstance(data, ev.ReferralAccepted) or data.to_status is ev.ReferralStatus.accepted:
                ref.accepted = True
            if isinstance(data, ev.ReferralCompleted) or data.to_status is ev.ReferralStatus.completed:
                ref.completed = True
                ref.accepted = True  # completion implies the referral was taken on
        elif isinstance(data, ev.ReferralOverdue):
            if ref.status not in TERMINAL:
                ref.overdue = True
        # referral.escalated changes no counter: the overdue/declined that caused it did
    elif isinstance(data, (ev.NotificationSent, ev.NotificationFailed, ev.NotificationAcknowledged)):
        kind = data.event_type.split(".", 1)[1]
        k = f"{data.channel.value}|{kind}"
        new.notifications[k] = new.notifications.get(k, 0) + 1
    return new, True


def contributions(state: CaseState) -> Counter:
    """Which counter keys this case adds to (and how much), from its state alone."""
    out: Counter = Counter()
    muni = state.municipality
    if muni is not None:
        month = state.month or state.first_month or UNKNOWN_MONTH
        ident = state.identification
        if ident is not None:
            out[("id", muni, month, "total", "")] += 1
            for dim, value in ident.items():
                out[("id", muni, month, dim, value)] += 1
        refs = state.referrals.values()
        stages = {
            "identified": ident is not None,
            "referred": bool(state.referrals),
            "acknowledged_in_time": any(r.ack_in_time for r in refs),
            "accepted": any(r.accepted for r in refs),
            "completed": any(r.completed for r in refs),
            "withdrawn": state.withdrawn,
            "school_enrolled": state.enrolled,
        }
        for stage, reached in stages.items():
            if reached:
                out[("fn", muni, month, stage)] += 1
    for r in state.referrals.values():
        if r.status not in TERMINAL:
            out[("ref", r.municipality, r.agency, "open")] += 1
            if r.overdue:
                out[("ref", r.municipality, r.agency, "overdue")] += 1
    for k, n in state.notifications.items():
        channel, kind = k.split("|", 1)
        out[("nt", channel, kind)] += n
    return out


def ack_samples(state: CaseState) -> list[tuple[str, str, float]]:
    """(municipality, agency, seconds to acknowledge) for each acknowledged referral."""
    return [(r.municipality, r.agency, r.ack_seconds) for r in state.referrals.values()
            if r.ack_seconds is not None]


def counter_deltas(old: CaseState, new: CaseState) -> dict[Key, int]:
    """The counter keys an event moves, with +n / -n (zero changes left out)."""
    a, b = contributions(old), contributions(new)
    out = {}
    for k in a.keys() | b.keys():
        d = b.get(k, 0) - a.get(k, 0)
        if d:
            out[k] = d
    return out


# --- a mergeable quantile sketch -------------------------------------------------------------


class LogHistogram:
    """A fixed logarithmic-bucket histogram (DDSketch-style): value v > 0 goes to bucket
    ceil(log_gamma(v)). Quantiles have a relative error of at most (gamma-1)/(gamma+1) (1 % for
    gamma=1.02); two sketches merge by adding bucket counts; a sample can be removed again (used
    when a case's contribution is recomputed). Values <= min_value share the lowest bucket."""

    def __init__(self, gamma: float = 1.02, min_value: float = 1.0):
        self.gamma = gamma
        self._log_gamma = math.log(gamma)
        self.min_value = min_value
        self.buckets: dict[int, int] = {}
        self.count = 0

    def _index(self, v: float) -> int:
        return math.ceil(math.log(max(v, self.min_value)) / self._log_gamma)

    def add(self, v: float, n: int = 1) -> None:
        i = self._index(v)
        c = self.buckets.get(i, 0) + n
        if c:
            self.buckets[i] = c
        else:
            self.buckets.pop(i, None)
        self.count += n

    def remove(self, v: float) -> None:
        self.add(v, -1)

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        assert other.gamma == self.gamma and other.min_value == self.min_value, "incompatible sketches"
        for i, c in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + c
        self.count += other.count
        return self

    def quantile(self, q: float) -> float | None:
        if self.count <= 0:
            return None
        if not 0 <= q <= 1:
            raise ValueError("q must be within [0, 1]")
        rank = q * (self.count - 1)
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen > rank:
                # representative value of bucket (gamma^(i-1), gamma^i]: relative error bound
                return 2 * self.gamma ** i / (self.gamma + 1)
        return 2 * self.gamma ** max(self.buckets) / (self.gamma + 1)


# --- the aggregate: sum of the contributions of every case ------------------------------------


class Aggregate:
    """Counters and sketches summed over the cases this worker holds. Updated by `replace`
    (old state -> new state of one case) and rebuilt by `rebuild` (from all states)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.ack: dict[tuple[str, str], LogHistogram] = {}  # (municipality, agency) -> sketch
        self.version = 0

    def _add(self, state: CaseState, sign: int) -> None:
        for k, n in contributions(state).items():
            self._bump(k, sign * n)
        for muni, agency, seconds in ack_samples(state):
            sk = self.ack.get((muni, agency))
            if sk is None:
                sk = self.ack[(muni, agency)] = LogHistogram()
            sk.add(seconds, sign)

    def _bump(self, k: Key, n: int) -> None:
        c = self.counts.get(k, 0) + n
        if c:
            self.counts[k] = c
        else:
            self.counts.pop(k, None)

    def replace(self, old: CaseState, new: CaseState) -> dict[Key, int]:
        deltas = counter_deltas(old, new)
        for k, d in deltas.items():
            self._bump(k, d)
        old_s, new_s = Counter(ack_samples(old)), Counter(ack_samples(new))
        for (muni, agency, seconds), n in (new_s - old_s).items():
            self.ack.setdefault((muni, agency), LogHistogram()).add(seconds, n)
        for (muni, agency, seconds), n in (old_s - new_s).items():
            self.ack.setdefault((muni, agency), LogHistogram()).add(seconds, -n)
        if deltas or old_s != new_s:
            self.version += 1
        return deltas

    def rebuild(self, states: Iterable[CaseState]) -> None:
        self.counts = Counter()
        self.ack = {}
        for s in states:
            self._add(s, +1)
        self.version += 1

    def add(self, state: CaseState) -> None:
        """Count one more case (rebuilding partition by partition)."""
        self._add(state, +1)

    def load_sum(self, parts: Iterable["Aggregate"]) -> None:
        """Become the sum of `parts` (the partial aggregates of disjoint sets of cases), in place."""
        counts: Counter = Counter()
        ack: dict[tuple[str, str], LogHistogram] = {}
        for part in parts:
            counts.update(part.counts)
            for k, sk in part.ack.items():
                ack.setdefault(k, LogHistogram(sk.gamma, sk.min_value)).merge(sk)
        self.counts = Counter({k: n for k, n in counts.items() if n})
        self.ack = ack
        self.version += 1

    def to_bytes(self) -> bytes:
        """The counters and sketches as compact JSON (a partial aggregate on its topic)."""
        return orjson.dumps({
            "c": [[*k, n] for k, n in self.counts.items()],
            "a": [[m, a, sk.gamma, sk.min_value, list(sk.buckets.items())] for (m, a), sk in self.ack.items()],
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Aggregate":
        d = orjson.loads(raw)
        agg = cls()
        agg.counts = Counter({tuple(row[:-1]): row[-1] for row in d["c"]})
        for m, a, gamma, min_value, buckets in d["a"]:
            sk = agg.ack[(m, a)] = LogHistogram(gamma, min_value)
            for i, n in buckets:
                sk.buckets[int(i)] = n
                sk.count += n
        return agg
