"""Use cases of the analytics API: read the aggregate for a viewer (exact and live within the
viewer's scope, the published disclosure-controlled snapshot everywhere else), shape tables for
JSON and CSV, publish the public snapshot on its cadence, and the live-change signals the SSE
stream waits on.

Keyword-only functions over `Aggregate`; no FastAPI here, so they are easy to test and reuse.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from services.analytics.rules import (
    BREAKDOWNS,
    FUNNEL_STAGES,
    REFERRAL_AGENCIES,
    UNKNOWN_MONTH,
    Aggregate,
    LogHistogram,
)
from services.analytics.disclosure import SUPPRESSED, Rules, next_boundary, public_view
from shared import access
from shared.auth import Claims
from shared.errors import Forbidden, Unauthenticated, Unavailable
from shared.reference import municipalities

log = logging.getLogger("clms.analytics")

# --- who is looking ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    """Coordinators and analysts see exact, live figures within their scope (their municipality,
    or every municipality and the national sums for "*"). Everyone else, and every figure
    outside the viewer's scope, comes from the published snapshot (`disclosure.public_view`)."""

    claims: Claims | None = None

    @property
    def is_public(self) -> bool:
        """No exact figure anywhere (shared/access_policy.yaml, analytics.exact)."""
        return access.policy().reach(self.claims, "analytics.exact") is None

    def exact_for(self, municipality: str | None) -> bool:
        """`municipality=None` means a national figure (a sum over municipalities)."""
        if self.claims is None:
            return False
        return bool(access.allowed(self.claims, "analytics.exact", access.Resource(municipality=municipality)))


def require_exact(viewer: Viewer, municipality: str | None, what: str) -> None:
    """Unauthenticated (401) or Forbidden (403) unless the viewer sees `municipality` (None:
    national) exactly."""
    if viewer.exact_for(municipality):
        return
    scope = f"municipality {municipality!r}" if municipality else "the national figures"
    if viewer.claims is None:
        raise Unauthenticated(f"{what} is for signed-in coordinators and analysts; send a Bearer token "
                              "(the public view is the published snapshot without it)")
    raise Forbidden(f"{what} is for coordinators and analysts of {scope}; this token's scope is "
                    f"{viewer.claims.municipality!r}")


def require_range_allowed(viewer: Viewer, months: MonthRange, municipality: str | None) -> None:
    """A month range is for exact viewers only: two ranges of the published view would
    difference each other."""
    if not months.whole:
        require_exact(viewer, municipality, "a month range (from/to)")


@dataclass(frozen=True)
class MonthRange:
    start: str | None = None  # "YYYY-MM", inclusive
    end: str | None = None

    def __contains__(self, month: str) -> bool:
        if self.start is None and self.end is None:
            return True
        if month == UNKNOWN_MONTH:
            return False
        return (self.start is None or month >= self.start) and (self.end is None or month <= self.end)

    @property
    def whole(self) -> bool:
        return self.start is None and self.end is None


# --- the published snapshot ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    view: dict[str, Any]  # disclosure.public_view(...)
    as_of: float  # epoch seconds: the figures count the events folded by then
    published_at: float

    @property
    def as_of_iso(self) -> str:
        return datetime.fromtimestamp(self.as_of, timezone.utc).isoformat(timespec="seconds")


class Publisher:
    """Publishes the public view on a fixed cadence with a lag, never live: at each period
    boundary (multiples of `every_s` since the epoch; daily = 00:00 UTC) the exact tallies are
    captured, and `lag_s` later their disclosure-controlled view replaces the published one. The
    first snapshot is published when the worker has recovered its tables (so a restart publishes
    once off the cadence: see the README's Privacy section)."""

    def __init__(self, *, rules: Rules, every_s: float, lag_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.rules, self.every_s, self.lag_s, self.clock = rules, every_s, lag_s, clock
        self.snapshot: Snapshot | None = None
        self.live = Live()  # wakes the public SSE streams on a new publication only
        self.on_publish: list[Callable[[], None]] = []

    def publish(self, exact_tally: dict[str, dict[str, Any]], *, as_of: float) -> Snapshot:
        view = public_view(exact_tally, self.rules, stages=FUNNEL_STAGES)
        self.snapshot = Snapshot(view=view, as_of=as_of, published_at=self.clock())
        self.live.changed()
        for callback in self.on_publish:
            callback()
        return self.snapshot

    async def run(self, agg: Aggregate, *, ready: Callable[[], bool]) -> None:
        while not ready():
            await asyncio.sleep(0.05)
        self.publish(tally(agg, MonthRange()), as_of=self.clock())
        while True:
            now = self.clock()
            boundary = next_boundary(now, self.every_s)
            await asyncio.sleep(max(0.0, boundary - now))
            captured = tally(agg, MonthRange())  # new dicts: later events do not change it
            if self.lag_s:
                await asyncio.sleep(self.lag_s)
            try:
                self.publish(captured, as_of=boundary)
            except Exception:  # noqa: BLE001 - keep the last snapshot, try again next period
                log.exception("publishing the public analytics view failed; the previous one stays")


def disclosure_terms(publisher: Publisher) -> dict[str, Any]:
    """The disclosure rules and cadence, stated beside the published figures."""
    r = publisher.rules
    return {"suppressed": f"{SUPPRESSED!r}: 1 to {r.small}, or hidden so that such a count cannot be worked out",
            "rounded_to": r.base, "breakdowns_from": r.breakdown_min,
            "cadence_seconds": publisher.every_s, "lag_seconds": publisher.lag_s}


# --- reading the aggregate -----------------------------------------------------------------------


def tally(agg: Aggregate, months: MonthRange) -> dict[str, dict[str, Any]]:
    """One pass over the counters: per municipality, identifications (total, by month, by
    dimension), funnel stages, open/overdue referrals per agency. Exact."""
    out: dict[str, dict[str, Any]] = {
        slug: {"identified": 0, "by_month": defaultdict(int),
               "breakdowns": {d: dict.fromkeys(vals, 0) for d, vals in BREAKDOWNS.items()},
               "funnel": dict.fromkeys(FUNNEL_STAGES, 0),
               "referrals": {a: {"open": 0, "overdue": 0} for a in REFERRAL_AGENCIES}}
        for slug in municipalities()
    }
    for key, n in agg.counts.items():
        kind = key[0]
        if kind == "id":
            _, muni, month, dim, value = key
            if muni not in out or month not in months:
                continue
            row = out[muni]
            if dim == "total":
                row["identified"] += n
                row["by_month"][month] += n
            else:
                bd = row["breakdowns"].setdefault(dim, {})
                bd[value] = bd.get(value, 0) + n
        elif kind == "fn":
            _, muni, month, stage = key
            if muni in out and month in months:
                out[muni]["funnel"][stage] += n
        elif kind == "ref":
            _, muni, agency, what = key
            if muni in out:
                out[muni]["referrals"].setdefault(agency, {"open": 0, "overdue": 0})[what] += n
    return out


class NotPublishedYet(Unavailable):
    """The first public snapshot is not published yet (the worker is still recovering): 503 with
    Retry-After 5."""


def _published(snapshot: Snapshot | None) -> Snapshot:
    if snapshot is None:
        raise NotPublishedYet("the first public snapshot is not published yet (the service is starting); "
                              "retry in a few seconds")
    return snapshot


def _rate(n: Any, pop: int | None) -> float | None:
    return round(n * 10_000 / pop, 3) if pop and isinstance(n, int) else None


def municipality_rows(agg: Aggregate, *, viewer: Viewer, months: MonthRange,
                      snapshot: Snapshot | None) -> list[dict[str, Any]]:
    """All 38 municipalities (zeros included), in the statistics office's order: exact for the
    municipalities the viewer coordinates or analyses, published everywhere else."""
    exact_tally = tally(agg, months) if not viewer.is_public else None
    rows = []
    for slug, m in municipalities().items():
        base = {"slug": slug, "code": m.code, "name": m.name_en, "name_sq": m.name_sq, "name_sr": m.name_sr,
                "population": m.population}
        if exact_tally is not None and viewer.exact_for(slug):
            t = exact_tally[slug]
            rows.append({**base, "exact": True,
                         "identified": t["identified"], "per_10000": _rate(t["identified"], m.population),
                         "hazardous": t["breakdowns"]["hazardous"]["true"],
                         "worst_form": t["breakdowns"]["worst_form"]["true"],
                         **{st: v for st, v in t["funnel"].items() if st != "identified"},
                         "open_referrals": sum(r["open"] for r in t["referrals"].values()),
                         "overdue_referrals": sum(r["overdue"] for r in t["referrals"].values())})
            continue
        p = _published(snapshot).view["municipalities"][slug]
        bd = p["breakdowns"]
        rows.append({**base, "exact": False,
                     "identified": p["identified"], "per_10000": _rate(p["identified"], m.population),
                     "hazardous": bd["hazardous"]["true"] if bd else None,
                     "worst_form": bd["worst_form"]["true"] if bd else None,
                     **{st: v for st, v in p["funnel"].items() if st != "identified"},
                     "open_referrals": None, "overdue_referrals": None})
    return rows


def municipality_detail(agg: Aggregate, *, viewer: Viewer, slug: str, months: MonthRange,
                        snapshot: Snapshot | None) -> dict[str, Any]:
    m = municipalities()[slug]
    head = {"slug": slug, "name": m.name_en, "population": m.population, "from": months.start, "to": months.end}
    if viewer.exact_for(slug):
        t = tally(agg, months)[slug]
        return {**head, "exact": True, "as_of": None, "breakdowns_offered": True,
                "identified": t["identified"],
                "by_month": dict(sorted(t["by_month"].items())),
                "breakdowns": t["breakdowns"], "funnel": t["funnel"], "referrals": t["referrals"]}
    snap = _published(snapshot)
    p = snap.view["municipalities"][slug]
    return {**head, "exact": False, "as_of": snap.as_of_iso, "breakdowns_offered": p["breakdowns"] is not None,
            "identified": p["identified"], "by_month": p["by_month"], "breakdowns": p["breakdowns"],
            "funnel": p["funnel"], "referrals": None}


def funnel(agg: Aggregate, *, viewer: Viewer, municipality: str | None, months: MonthRange,
           snapshot: Snapshot | None) -> dict[str, Any]:
    head = {"municipality": municipality, "from": months.start, "to": months.end}
    exact_tally = tally(agg, months) if not viewer.is_public else None
    if viewer.exact_for(municipality):
        assert exact_tally is not None
        slugs = [municipality] if municipality else list(exact_tally)
        stages = dict.fromkeys(FUNNEL_STAGES, 0)
        refs = {a: {"open": 0, "overdue": 0} for a in REFERRAL_AGENCIES}
        for s in slugs:
            for stage, n in exact_tally[s]["funnel"].items():
                stages[stage] += n
            for a, r in exact_tally[s]["referrals"].items():
                for k, n in r.items():
                    refs.setdefault(a, {"open": 0, "overdue": 0})[k] += n
        out: dict[str, Any] = {**head, "exact": True, "as_of": None,
                               "stages": [{"stage": s, "count": n} for s, n in stages.items()],
                               "referrals_by_agency": refs}
    else:
        snap = _published(snapshot)
        view = snap.view
        published = view["national"]["funnel"] if municipality is None else view["municipalities"][municipality]["funnel"]
        out = {**head, "exact": False, "as_of": snap.as_of_iso,
               "stages": [{"stage": s, "count": published[s]} for s in FUNNEL_STAGES],
               "referrals_by_agency": None}
    if municipality is None:
        out["municipalities"] = {
            s: (dict(exact_tally[s]["funnel"]) if exact_tally is not None and viewer.exact_for(s)
                else dict(_published(snapshot).view["municipalities"][s]["funnel"]))
            for s in municipalities()
        }
    return out


def time_to_acknowledge(agg: Aggregate, *, municipality: str | None) -> dict[str, Any]:
    """Median and 90th percentile of created -> acknowledged, per agency, from the sketches.
    Exact: for viewers with an exact scope only (the views check)."""
    per_agency: dict[str, LogHistogram] = {a: LogHistogram() for a in REFERRAL_AGENCIES}
    for (muni, agency), sk in agg.ack.items():
        if municipality is None or muni == municipality:
            per_agency.setdefault(agency, LogHistogram()).merge(sk)
    rows = []
    for agency, sk in per_agency.items():
        visible = sk.count > 0
        rows.append({
            "agency": agency, "acknowledged": sk.count,
            "median_seconds": round(sk.quantile(0.5), 1) if visible else None,
            "p90_seconds": round(sk.quantile(0.9), 1) if visible else None,
        })
    return {"municipality": municipality, "relative_error": round((1.02 - 1) / (1.02 + 1), 4),
            "agencies": rows}


def summary(agg: Aggregate, *, viewer: Viewer, snapshot: Snapshot | None) -> dict[str, Any]:
    """What the live stream pushes: every municipality row and the national funnel."""
    months = MonthRange()
    f = funnel(agg, viewer=viewer, municipality=None, months=months, snapshot=snapshot)
    return {
        "as_of": snapshot.as_of_iso if snapshot else None,
        "municipalities": municipality_rows(agg, viewer=viewer, months=months, snapshot=snapshot),
        "funnel": f["stages"],
    }


# --- CSV -----------------------------------------------------------------------------------------


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


MUNICIPALITY_COLUMNS = ["slug", "code", "name", "population", "exact", "identified", "per_10000", "hazardous",
                        "worst_form", *[s for s in FUNNEL_STAGES if s != "identified"],
                        "open_referrals", "overdue_referrals"]


def municipalities_csv(rows: list[dict[str, Any]]) -> str:
    return to_csv(rows, MUNICIPALITY_COLUMNS)


def detail_csv(detail: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = [{"table": "identified", "key": "total", "value": "", "count": detail["identified"]}]
    rows += [{"table": "by_month", "key": m, "value": "", "count": n} for m, n in (detail["by_month"] or {}).items()]
    for dim, vals in (detail["breakdowns"] or {}).items():
        rows += [{"table": "breakdown", "key": dim, "value": v, "count": n} for v, n in vals.items()]
    rows += [{"table": "funnel", "key": s, "value": "", "count": n} for s, n in detail["funnel"].items()]
    for agency, r in (detail["referrals"] or {}).items():
        rows += [{"table": "referrals", "key": agency, "value": k, "count": n} for k, n in r.items()]
    return to_csv(rows, ["table", "key", "value", "count"])


def funnel_csv(result: dict[str, Any]) -> str:
    scope = result["municipality"] or "all"
    rows = [{"municipality": scope, "stage": s["stage"], "count": s["count"]} for s in result["stages"]]
    for slug, stages in (result.get("municipalities") or {}).items():
        rows += [{"municipality": slug, "stage": st, "count": n} for st, n in stages.items()]
    return to_csv(rows, ["municipality", "stage", "count"])


# --- live change signal ----------------------------------------------------------------------------


class Live:
    """Wakes every SSE stream when the aggregate changes. `token()` before reading, then
    `wait(token)`: a change between the read and the wait is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def token(self) -> asyncio.Event:
        return self._event

    @staticmethod
    async def wait(token: asyncio.Event, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(token.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
