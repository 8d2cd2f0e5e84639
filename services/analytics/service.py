"""Use cases of the analytics API: read the aggregate for a viewer (suppression applied),
shape tables for JSON and CSV, and the live-change signal the SSE stream waits on.

Keyword-only functions over `Aggregate`; no FastAPI here, so they are easy to test and reuse.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from services.analytics.counting import (
    BREAKDOWNS,
    FUNNEL_STAGES,
    REFERRAL_AGENCIES,
    UNKNOWN_MONTH,
    Aggregate,
    LogHistogram,
    suppress,
)
from shared.auth import Claims, Role
from shared.reference import municipalities


# --- who is looking ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    """The public (no token, or role public) sees counts 1-4 as "<5"; a municipality's coordinator
    sees exact figures for that municipality; a coordinator for "*" sees every figure exactly."""

    claims: Claims | None = None

    @property
    def is_public(self) -> bool:
        c = self.claims
        return c is None or not c.is_coordinator or (Role.public in c.roles and Role.coordinator not in c.roles)

    def exact_for(self, municipality: str | None) -> bool:
        """`municipality=None` means a national figure (a sum over municipalities)."""
        if self.is_public:
            return False
        assert self.claims is not None
        if municipality is None:
            return self.claims.municipality == "*"
        return self.claims.coordinates(municipality)

    def show(self, n: int, municipality: str | None) -> int | str:
        return suppress(n, exact=self.exact_for(municipality))


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


# --- reading the aggregate -----------------------------------------------------------------------


def _tally(agg: Aggregate, months: MonthRange) -> dict[str, dict[str, Any]]:
    """One pass over the counters: per municipality, identifications (total, by month, by
    dimension), funnel stages, open/overdue referrals per agency."""
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


def municipality_rows(agg: Aggregate, *, viewer: Viewer, months: MonthRange) -> list[dict[str, Any]]:
    """All 38 municipalities (zeros included), in the statistics office's order."""
    tally = _tally(agg, months)
    rows = []
    for slug, m in municipalities().items():
        t = tally[slug]
        n = t["identified"]
        exact = viewer.exact_for(slug)
        shown = suppress(n, exact=exact)
        pop = m.population
        rate = round(n * 10_000 / pop, 3) if pop and isinstance(shown, int) else None
        open_refs = sum(r["open"] for r in t["referrals"].values())
        overdue = sum(r["overdue"] for r in t["referrals"].values())
        rows.append({
            "slug": slug, "code": m.code, "name": m.name_en, "name_sq": m.name_sq, "name_sr": m.name_sr,
            "population": pop,
            "identified": shown,
            "per_10000": rate,
            "hazardous": suppress(t["breakdowns"]["hazardous"]["true"], exact=exact),
            "worst_form": suppress(t["breakdowns"]["worst_form"]["true"], exact=exact),
            **{stage: suppress(v, exact=exact) for stage, v in t["funnel"].items() if stage != "identified"},
            "open_referrals": suppress(open_refs, exact=exact),
            "overdue_referrals": suppress(overdue, exact=exact),
        })
    return rows


def municipality_detail(agg: Aggregate, *, viewer: Viewer, slug: str, months: MonthRange) -> dict[str, Any]:
    t = _tally(agg, months)[slug]
    exact = viewer.exact_for(slug)
    m = municipalities()[slug]
    return {
        "slug": slug, "name": m.name_en, "population": m.population,
        "from": months.start, "to": months.end,
        "exact": exact,
        "identified": suppress(t["identified"], exact=exact),
        "by_month": {k: suppress(v, exact=exact) for k, v in sorted(t["by_month"].items())},
        "breakdowns": {d: {v: suppress(n, exact=exact) for v, n in vals.items()}
                       for d, vals in t["breakdowns"].items()},
        "funnel": {s: suppress(n, exact=exact) for s, n in t["funnel"].items()},
        "referrals": {a: {k: suppress(n, exact=exact) for k, n in r.items()}
                      for a, r in t["referrals"].items()},
    }


def funnel(agg: Aggregate, *, viewer: Viewer, municipality: str | None, months: MonthRange) -> dict[str, Any]:
    tally = _tally(agg, months)
    slugs = [municipality] if municipality else list(tally)
    stages = dict.fromkeys(FUNNEL_STAGES, 0)
    refs = {a: {"open": 0, "overdue": 0} for a in REFERRAL_AGENCIES}
    for s in slugs:
        for stage, n in tally[s]["funnel"].items():
            stages[stage] += n
        for a, r in tally[s]["referrals"].items():
            for k, n in r.items():
                refs.setdefault(a, {"open": 0, "overdue": 0})[k] += n
    exact = viewer.exact_for(municipality)
    out: dict[str, Any] = {
        "municipality": municipality, "from": months.start, "to": months.end,
        "stages": [{"stage": s, "count": suppress(n, exact=exact)} for s, n in stages.items()],
        "referrals_by_agency": {a: {k: suppress(n, exact=exact) for k, n in r.items()} for a, r in refs.items()},
    }
    if municipality is None:
        out["municipalities"] = {
            s: {stage: viewer.show(n, s) for stage, n in tally[s]["funnel"].items()} for s in tally
        }
    return out


def time_to_acknowledge(agg: Aggregate, *, viewer: Viewer, municipality: str | None) -> dict[str, Any]:
    """Median and 90th percentile of created -> acknowledged, per agency, from the sketches."""
    per_agency: dict[str, LogHistogram] = {a: LogHistogram() for a in REFERRAL_AGENCIES}
    for (muni, agency), sk in agg.ack.items():
        if municipality is None or muni == municipality:
            per_agency.setdefault(agency, LogHistogram()).merge(sk)
    exact = viewer.exact_for(municipality)
    rows = []
    for agency, sk in per_agency.items():
        shown = suppress(sk.count, exact=exact)
        visible = isinstance(shown, int) and sk.count > 0
        rows.append({
            "agency": agency, "acknowledged": shown,
            "median_seconds": round(sk.quantile(0.5), 1) if visible else None,
            "p90_seconds": round(sk.quantile(0.9), 1) if visible else None,
        })
    return {"municipality": municipality, "relative_error": round((1.02 - 1) / (1.02 + 1), 4),
            "agencies": rows}


def summary(agg: Aggregate, *, viewer: Viewer) -> dict[str, Any]:
    """What the live stream pushes: every municipality row and the national funnel."""
    months = MonthRange()
    return {
        "municipalities": municipality_rows(agg, viewer=viewer, months=months),
        "funnel": funnel(agg, viewer=viewer, municipality=None, months=months)["stages"],
    }


# --- CSV -----------------------------------------------------------------------------------------


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


MUNICIPALITY_COLUMNS = ["slug", "code", "name", "population", "identified", "per_10000", "hazardous",
                        "worst_form", *[s for s in FUNNEL_STAGES if s != "identified"],
                        "open_referrals", "overdue_referrals"]


def municipalities_csv(rows: list[dict[str, Any]]) -> str:
    return to_csv(rows, MUNICIPALITY_COLUMNS)


def detail_csv(detail: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = [{"table": "identified", "key": "total", "value": "", "count": detail["identified"]}]
    rows += [{"table": "by_month", "key": m, "value": "", "count": n} for m, n in detail["by_month"].items()]
    for dim, vals in detail["breakdowns"].items():
        rows += [{"table": "breakdown", "key": dim, "value": v, "count": n} for v, n in vals.items()]
    rows += [{"table": "funnel", "key": s, "value": "", "count": n} for s, n in detail["funnel"].items()]
    for agency, r in detail["referrals"].items():
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
