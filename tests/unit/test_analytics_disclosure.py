"""Disclosure control of the public analytics view (services/analytics/disclosure.py), pure:
rounding and suppression, secondary suppression that no subtraction undoes, no breakdowns of
small populations, the same answer to the same question, and a single new case whose sex,
community, age band, sector and reporting agency change nothing in the published view."""

from __future__ import annotations

import math
import random
from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.analytics import rules as c
from services.analytics import disclosure as d
from services.analytics import service
from services.analytics.service import MonthRange
from shared import events as ev
from tests import builders

R = d.Rules()


# --- rounding and suppression of one figure ---------------------------------------------------------


@pytest.mark.parametrize("n,shown", [(0, 0), (1, "c"), (5, "c"), (6, 5), (7, 5), (8, 10), (12, 10), (13, 15),
                                     (122, 120), (123, 125)])
def test_counts_1_to_5_are_suppressed_and_others_rounded_to_5(n, shown):
    assert d.round_count(n, R) == shown


@given(n=st.integers(0, 5000), small=st.integers(1, 12), base=st.integers(1, 12))
def test_what_a_published_figure_tells_contains_the_truth(n, small, base):
    rules = d.Rules(small=small, base=base, breakdown_min=small + 1)
    p = d.round_count(n, rules)
    lo, hi = d.bounds(p, rules)
    assert lo <= n <= hi
    if p != d.SUPPRESSED:
        # every value the bounds admit rounds to the same published figure (the bounds are exact)
        assert all(d.round_count(v, rules) == p for v in range(int(lo), int(hi) + 1))


# --- one additive table: margin and cells ------------------------------------------------------------


cells_st = st.dictionaries(st.sampled_from([f"k{i:02d}" for i in range(12)]),
                           st.one_of(st.integers(0, 8), st.integers(0, 60)), min_size=1, max_size=12)


@given(cells=cells_st)
def test_no_suppressed_cell_is_recoverable_by_subtraction_from_the_published_margin(cells):
    margin = sum(cells.values())
    pub_margin, pub = d.protect(margin, cells, R)
    assert pub_margin == d.round_count(margin, R)
    for k, p in pub.items():
        if p == d.SUPPRESSED:
            lo, hi = d.attacker_interval(pub_margin, pub, k, R)
            assert lo <= cells[k] <= hi  # sound: the truth is in the interval
            # ... and the interval leaves at least min_range candidates from 0 to 5
            candidates = [v for v in range(0, R.small + 1) if lo <= v <= hi]
            assert len(candidates) >= R.min_range, (cells, pub_margin, pub, k)
        else:
            assert p == d.round_count(cells[k], R)  # visible cells are rounded, never exact
    # every small cell is hidden
    assert all(pub[k] == d.SUPPRESSED for k, n in cells.items() if 1 <= n <= R.small)


@given(cells=cells_st, seed=st.integers(0, 1000))
def test_the_same_question_gets_the_same_answer(cells, seed):
    keys = list(cells)
    random.Random(seed).shuffle(keys)
    shuffled = {k: cells[k] for k in keys}
    assert d.protect(sum(cells.values()), cells, R) == d.protect(sum(cells.values()), shuffled, R)


def test_the_issue_attack_national_total_minus_visible_municipalities_no_longer_gives_prizren():
    # Prizren 1 (hidden), Mamushe 6, Gjilan 40: before, the exact national 47 - 6 - 40 = 1.
    cells = {"prizren": 1, "mamushe": 6, "gjilan": 40, "decan": 0}
    pub_margin, pub = d.protect(47, cells, R)
    assert pub["prizren"] == "c"
    lo, hi = d.attacker_interval(pub_margin, pub, "prizren", R)
    assert hi - max(lo, 0) >= 2  # at least {0, 1, 2} stay possible
    assert pub_margin == 45 and pub["gjilan"] == 40


def test_a_hidden_cell_pinned_by_subtraction_gets_a_secondary_suppression():
    # 7 children: 6 boys, 1 girl. Margin 7 -> 5 (6..7), boys 6 -> 5 (6..7): girls = 0..1 only,
    # so the boys' cell is hidden too.
    cells = {"male": 6, "female": 1, "unknown": 0}
    pub_margin, pub = d.protect(7, cells, R)
    assert pub == {"male": "c", "female": "c", "unknown": 0} and pub_margin == 5
    lo, hi = d.attacker_interval(pub_margin, pub, "female", R)
    assert len([v for v in range(6) if lo <= v <= hi]) >= R.min_range
    # without the secondary suppression the girl would be pinned to 0..1
    lo, hi = d.attacker_interval(5, {"male": 5, "female": "c", "unknown": 0}, "female", R)
    assert (lo, hi) == (0, 1)


# --- the whole public view -----------------------------------------------------------------------------


MUNIS = ("prizren", "mamushe", "gjilan", "decan", "prishtine")
case_st = st.fixed_dictionaries({
    "municipality": st.sampled_from(MUNIS),
    "sex": st.sampled_from(list(ev.Sex)),
    "community": st.sampled_from(list(ev.Community)),
    "age_band": st.sampled_from(list(ev.AgeBand)),
    "reporter_agency": st.sampled_from([ev.AgencyType.police, ev.AgencyType.csw, ev.AgencyType.labour_inspectorate]),
    "month": st.integers(1, 6),
    "hazardous": st.booleans(),
    "work": st.sampled_from([(ev.Sector.scrap_metal_waste, "scrap_collection"), (ev.Sector.agriculture, "harvesting"),
                             (ev.Sector.begging, "forced_begging"), (ev.Sector.street_work, "car_washing")]),
})


def _state(case: dict) -> c.CaseState:
    ident = builders.case_identified(
        municipality=case["municipality"], sex=case["sex"], community=case["community"],
        age_band=case["age_band"], reporter_agency=case["reporter_agency"],
        identified_on=date(2026, case["month"], 3), hazardous=case["hazardous"],
        sector=case["work"][0], activity=case["work"][1], worst_form=case["work"][1] == "forced_begging")
    state, _ = c.apply_event(c.CaseState(), builders.envelope(ident))
    return state


def _view(cases: list[dict]) -> dict:
    agg = c.Aggregate()
    agg.rebuild(_state(x) for x in cases)
    return d.public_view(service.tally(agg, MonthRange()), R, stages=c.FUNNEL_STAGES)


def _tables(view: dict):
    """Every additive table of the published view: (margin, cells, upper bounds the attacker
    knows from elsewhere: a funnel stage is at most the published stage before it)."""
    munis = view["municipalities"]
    caps: dict = {}
    for stage, margin in view["national"]["funnel"].items():
        cells = {s: m["funnel"][stage] for s, m in munis.items()}
        yield margin, cells, caps
        caps = {s: min(d.bounds(p, R)[1], caps.get(s, math.inf)) for s, p in cells.items()}
    for m in munis.values():
        if m["breakdowns"] is not None:
            for cells in m["breakdowns"].values():
                yield m["identified"], cells, {}
            yield m["identified"], m["by_month"], {}


many_cases = st.lists(case_st, min_size=0, max_size=80)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=many_cases)
def test_public_view_protects_every_table_and_offers_no_breakdown_of_a_small_municipality(cases):
    view = _view(cases)
    for margin, cells, caps in _tables(view):
        assert d.is_protected(margin, cells, R, caps)
    # a municipality hidden at one funnel stage is hidden at every later one (no lower bounds)
    for m in view["municipalities"].values():
        shown = [m["funnel"][s] for s in c.FUNNEL_STAGES]
        if "c" in shown:
            assert all(p == "c" for p in shown[shown.index("c"):]), shown
    for slug in MUNIS:
        n = sum(1 for x in cases if x["municipality"] == slug)
        m = view["municipalities"][slug]
        if n < R.breakdown_min:
            assert m["breakdowns"] is None and m["by_month"] is None
        # nothing published is an exact count from 1 to 5, and nothing is a non-multiple of 5
        for margin, cells, _ in _tables(view):
            for p in (margin, *cells.values()):
                assert p == d.SUPPRESSED or p % R.base == 0
    assert _view(cases) == view  # deterministic


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=many_cases, one=case_st, other=case_st)
def test_one_new_case_in_a_small_municipality_reveals_none_of_its_attributes(cases, one, other):
    """Differencing: the published view after one new case in Mamushe is the same whatever the
    case's sex, community, age band, sector, reporting agency, month or hazardous flag."""
    cases = [x for x in cases if x["municipality"] != "mamushe"] + \
        [{**one, "municipality": "mamushe"} for _ in range(random.Random(len(cases)).randint(0, 12))]
    first = {**one, "municipality": "mamushe"}
    second = {**other, "municipality": "mamushe"}
    assert _view(cases + [first]) == _view(cases + [second])


def test_next_boundary_is_aligned_to_the_epoch():
    assert d.next_boundary(0.0, 86400) == 86400
    assert d.next_boundary(86399.9, 86400) == 86400
    assert d.next_boundary(86400.0, 86400) == 172800  # strictly after
    assert d.next_boundary(10.5, 2) == 12
    with pytest.raises(ValueError):
        d.next_boundary(1.0, 0)
    assert math.isclose(d.next_boundary(1_700_000_000.3, 0.5), 1_700_000_000.5)


def test_disclosure_module_has_no_io_imports():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(d))
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"faust", "fastapi", "aiokafka", "asyncpg", "asyncio", "httpx"}
