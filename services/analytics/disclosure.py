"""Statistical disclosure control of the public analytics view: pure functions, no I/O.

The public (no token, or a token without an exact scope) never sees live or exact figures. It
sees a *published snapshot*: the exact tallies captured at a period boundary, passed through
`public_view`, which follows what statistics offices do for small child populations (the UK's
children-in-need statistics; the ESSnet SDC handbook's rounding and suppression):

1. **Small counts suppressed.** A count from 1 to `small` (5) is shown as `"c"`; 0 is shown as 0.
2. **Every other figure rounded** to the nearest multiple of `base` (5), halves up: cells *and*
   margins (municipality totals, national totals) alike, each rounded on its own. Rounding is
   deterministic, so the same question on the same snapshot always gets the same answer (no
   averaging attack over repeated queries, unlike fresh random noise).
3. **Secondary suppression.** Each published table that adds up (a margin and its cells: the
   national count of a funnel stage and the 38 municipalities; a municipality's total and its
   sex, community, age band, sector, reporting agency, hazardous, worst-form or month cells) is
   checked the way an attacker would subtract: for every suppressed cell, the interval the
   published margin minus the published (rounded) visible cells leaves for it
   (`attacker_interval`) must hold at least `min_range` possible values from 0 to `small`.
   While one does not, the smallest visible non-zero cell is suppressed too (ties by name, so
   the choice is deterministic; zero cells only when nothing else is left).
4. **No breakdowns of small populations.** A municipality with fewer than `breakdown_min`
   identified children (or whose total is suppressed) has no breakdowns at all (`None`): no
   sex, community, age band, sector, agency, hazardous, worst form or month. Its public figures
   are its total and its funnel stages (outcomes of the process, not attributes of the child).

Not published to the public at all (authenticated coordinators and analysts only): referral
counts per agency and per municipality, and time to acknowledge, because the agencies a case is
referred to follow from the child's age, sector and form of work.

The funnel stages are nested tables (each stage at most the one before): a municipality hidden
at one stage is hidden at every later one, and the upper bounds the stage before gives are part
of the attacker's arithmetic. What this does not check: other relations between tables (a
breakdown cell and a funnel stage of the same municipality); and in a municipality above
`breakdown_min`, a breakdown cell can move by one rounding step between two snapshots when
exactly one case was added there in the period. See the README's Privacy section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPRESSED = "c"
INF = math.inf

Published = int | str  # a rounded count, or "c"


@dataclass(frozen=True)
class Rules:
    small: int = 5  # counts 1..small are suppressed
    base: int = 5  # every other count is rounded to a multiple of base
    breakdown_min: int = 20  # municipalities with fewer identified children get no breakdowns
    min_range: int = 3  # a suppressed cell's attacker interval holds at least this many values in 0..small

    def __post_init__(self) -> None:
        if self.small < 1 or self.base < 1 or self.min_range < 1:
            raise ValueError("small, base and min_range must be at least 1")
        if self.breakdown_min <= self.small:
            raise ValueError("breakdown_min must be larger than small")


def round_count(n: int, rules: Rules) -> Published:
    """0 -> 0; 1..small -> "c"; else the nearest multiple of base (halves up), never below base."""
    if n < 0:
        raise ValueError(f"a count cannot be negative: {n}")
    if n == 0:
        return 0
    if n <= rules.small:
        return SUPPRESSED
    return max(rules.base, rules.base * math.floor(n / rules.base + 0.5))


def bounds(p: Published, rules: Rules, *, margin: bool = False) -> tuple[float, float]:
    """What a published figure tells an attacker who knows these rules: the true count lies in
    [lo, hi]. A suppressed cell may be a secondary suppression of any size: [0, inf). A margin is
    never secondarily suppressed, so a suppressed margin is 1..small."""
    if p == SUPPRESSED:
        return (1, rules.small) if margin else (0, INF)
    assert isinstance(p, int)
    if p == 0:
        return (0, 0)
    # values n with round(n) == p: n/base + 1/2 in [p/base, p/base + 1)
    lo = rules.small + 1 if p == rules.base else max(rules.small + 1, p - rules.base // 2)
    hi = p + (rules.base - 1) // 2 if rules.base % 2 else p + rules.base // 2 - 1
    return (lo, hi)


def attacker_interval(margin: Published, cells: Mapping[str, Published], key: str, rules: Rules,
                      caps: Mapping[str, float] | None = None) -> tuple[float, float]:
    """The interval for `cells[key]` that subtraction gives: margin minus every other cell, each
    taken at its published bounds (the cells add up to the margin). `caps` are upper bounds the
    attacker knows from other tables (a funnel stage is at most the stage before it)."""
    caps = caps or {}

    def cell(k: str) -> tuple[float, float]:
        lo, hi = bounds(cells[k], rules)
        return lo, min(hi, caps.get(k, INF))

    m_lo, m_hi = bounds(margin, rules, margin=True)
    o_lo = o_hi = 0.0
    for k in cells:
        if k == key:
            continue
        lo, hi = cell(k)
        o_lo += lo
        o_hi += hi
    own_lo, own_hi = cell(key)
    return max(own_lo, m_lo - o_hi), min(own_hi, m_hi - o_lo)


def _values_in_small_range(lo: float, hi: float, rules: Rules) -> int:
    lo_i, hi_i = max(0, math.ceil(lo)), min(rules.small, math.floor(hi) if hi != INF else rules.small)
    return max(0, hi_i - lo_i + 1)


def is_protected(margin: Published, cells: Mapping[str, Published], rules: Rules,
                 caps: Mapping[str, float] | None = None) -> bool:
    """Every suppressed cell keeps at least `min_range` possible values in 0..small (a cell the
    published figures prove to be 0, e.g. under a margin of 0, counts no child and is safe)."""
    for k, p in cells.items():
        if p != SUPPRESSED:
            continue
        lo, hi = attacker_interval(margin, cells, k, rules, caps)
        if hi >= 1 and _values_in_small_range(lo, hi, rules) < rules.min_range:
            return False
    return True


def protect(margin: int, cells: Mapping[str, int], rules: Rules, *, withheld: frozenset[str] = frozenset(),
            caps: Mapping[str, float] | None = None) -> tuple[Published, dict[str, Published]]:
    """Publish one additive table (cells add up to `margin`): round or suppress the margin and
    each cell, then suppress further cells (smallest first) until no suppressed cell can be
    narrowed by subtraction below `min_range` values. `withheld` cells are suppressed whatever
    their size (not offered); `caps` as in `attacker_interval`."""
    pub_margin = round_count(margin, rules)
    pub = {k: (SUPPRESSED if k in withheld else round_count(n, rules)) for k, n in cells.items()}
    # smallest non-zero cells first (least information lost); zeros last (hiding a zero only
    # helps when nothing else is left, and would grey out every municipality without a case)
    candidates = sorted((n == 0, n, k) for k, n in cells.items() if pub[k] != SUPPRESSED)
    while not is_protected(pub_margin, pub, rules, caps) and candidates:
        _, _, k = candidates.pop(0)
        pub[k] = SUPPRESSED
    return pub_margin, pub


# --- the public view of the analytics tallies -----------------------------------------------------


def public_view(tally: Mapping[str, Mapping[str, Any]], rules: Rules, *,
                stages: tuple[str, ...]) -> dict[str, Any]:
    """The published figures from the exact per-municipality tallies (as built by
    `service.tally`: `identified`, `by_month`, `breakdowns` {dimension: {value: n}}, `funnel`
    {stage: n}). Returns `{"national": {"funnel": {stage: P}}, "municipalities": {slug: {
    "identified": P, "funnel": {stage: P}, "breakdowns": {dim: {value: P}} | None,
    "by_month": {month: P} | None}}}`. Deterministic: the same tallies give the same view."""
    slugs = list(tally)
    national: dict[str, Published] = {}
    per_muni: dict[str, dict[str, Published]] = {s: {} for s in slugs}
    # The stages are nested (each at most the one before). So that no visible later stage gives
    # a lower bound to a hidden earlier one, a municipality hidden at one stage is hidden at
    # every later stage; and the attacker's upper bounds from the stage before are checked.
    hidden: frozenset[str] = frozenset()
    caps: dict[str, float] = {}
    for stage in stages:
        cells = {s: int(tally[s]["funnel"].get(stage, 0)) for s in slugs}
        pub_margin, pub = protect(sum(cells.values()), cells, rules, withheld=hidden, caps=caps)
        national[stage] = pub_margin
        for s in slugs:
            per_muni[s][stage] = pub[s]
        hidden = frozenset(s for s in slugs if pub[s] == SUPPRESSED)
        caps = stage_caps(pub, caps, rules)

    out: dict[str, Any] = {}
    for s in slugs:
        t = tally[s]
        n = int(t["identified"])
        shown = per_muni[s]["identified"]
        offered = n >= rules.breakdown_min and isinstance(shown, int)
        breakdowns = by_month = None
        if offered:
            breakdowns = {}
            for dim, vals in t["breakdowns"].items():
                _, pub = protect(n, {v: int(c) for v, c in vals.items()}, rules)
                breakdowns[dim] = pub
            _, by_month = protect(n, {m: int(c) for m, c in sorted(t["by_month"].items())}, rules)
        out[s] = {"identified": shown, "funnel": dict(per_muni[s]), "breakdowns": breakdowns, "by_month": by_month}
    return {"national": {"funnel": national}, "municipalities": out}


def stage_caps(published: Mapping[str, Published], previous: Mapping[str, float], rules: Rules) -> dict[str, float]:
    """Upper bounds of the next funnel stage per municipality, from this stage as published."""
    return {k: min(bounds(p, rules)[1], previous.get(k, INF)) for k, p in published.items()}


def next_boundary(now: float, every_s: float) -> float:
    """The next period boundary strictly after `now` (periods aligned to the Unix epoch, so a
    daily cadence turns at 00:00 UTC)."""
    if every_s <= 0:
        raise ValueError("the publication period must be positive")
    return (math.floor(now / every_s) + 1) * every_s
