"""Analytics read side without I/O: who sees exact figures, month ranges, the 38-row table,
CSV shapes, and the simplified map."""

from __future__ import annotations

import csv
import io
import json
from datetime import date

from services.analytics import rules as c
from services.analytics import geo, service
from services.analytics.disclosure import Rules
from services.analytics.service import MonthRange, Viewer
from shared import events as ev
from shared.auth import Claims
from shared.reference import municipality_slugs
from tests import builders


def _claims(**kw) -> Claims:
    base = dict(sub="coordinator.prizren", agency="coordinator", municipality="prizren", roles=("coordinator",))
    base.update(kw)
    return Claims(**base)


def test_viewer_exactness():
    assert not Viewer(None).exact_for("prizren")
    assert Viewer(_claims()).exact_for("prizren")
    assert not Viewer(_claims()).exact_for("gjilan")
    assert not Viewer(_claims()).exact_for(None)  # a national sum is not "their" municipality
    assert Viewer(_claims(municipality="*")).exact_for(None)
    assert Viewer(_claims(municipality="*")).exact_for("gjilan")
    police = _claims(sub="police.prizren.duty", agency="police", roles=("reporter",))
    assert not Viewer(police).exact_for("prizren")
    public = _claims(sub="x", agency="ngo", roles=("public",))
    assert not Viewer(public).exact_for("prizren")
    # roles are bound to agencies (shared/access_policy.yaml): an NGO token's `analyst` gives nothing
    ngo_analyst = _claims(sub="analyst.x", agency="ngo", municipality="*", roles=("analyst",))
    assert not Viewer(ngo_analyst).exact_for(None) and not Viewer(ngo_analyst).exact_for("gjilan")
    analyst = _claims(sub="analyst.x", agency="coordinator", municipality="*", roles=("analyst",))
    assert Viewer(analyst).exact_for(None) and Viewer(analyst).exact_for("gjilan")


def test_month_range():
    r = MonthRange("2026-02", "2026-03")
    assert "2026-02" in r and "2026-03" in r
    assert "2026-01" not in r and "2026-04" not in r and c.UNKNOWN_MONTH not in r
    assert c.UNKNOWN_MONTH in MonthRange() and "1999-01" in MonthRange()
    assert "2030-01" in MonthRange("2026-01", None)


def _aggregate(n_prizren: int, n_gjilan: int) -> c.Aggregate:
    states = []
    for muni, n in (("prizren", n_prizren), ("gjilan", n_gjilan)):
        for _ in range(n):
            s, _ = c.apply_event(c.CaseState(), builders.envelope(
                builders.case_identified(municipality=muni, identified_on=date(2026, 5, 1))))
            states.append(s)
    agg = c.Aggregate()
    agg.rebuild(states)
    return agg


def _snapshot(agg: c.Aggregate) -> service.Snapshot:
    p = service.Publisher(rules=Rules(), every_s=60, lag_s=0)
    return p.publish(service.tally(agg, MonthRange()), as_of=0.0)


def test_rows_cover_all_38_and_hide_rates_of_hidden_counts():
    agg = _aggregate(8, 3)
    snap = _snapshot(agg)
    rows = {r["slug"]: r for r in service.municipality_rows(agg, viewer=Viewer(None), months=MonthRange(),
                                                             snapshot=snap)}
    assert set(rows) == set(municipality_slugs())
    # published: 8 rounded to 10 (the rate is of the published figure), 3 suppressed
    assert rows["prizren"]["identified"] == 10 and rows["prizren"]["exact"] is False
    assert rows["prizren"]["per_10000"] == round(10 * 10_000 / rows["prizren"]["population"], 3)
    assert rows["gjilan"]["identified"] == "c" and rows["gjilan"]["per_10000"] is None
    assert rows["decan"]["identified"] == 0
    # fewer than 20 children: no breakdowns, and referrals are never public
    assert rows["prizren"]["hazardous"] is None and rows["prizren"]["open_referrals"] is None
    # the gjilan coordinator sees gjilan exactly and live, rate included; prizren as published
    g = Viewer(_claims(sub="coordinator.gjilan", municipality="gjilan"))
    rows = {r["slug"]: r for r in service.municipality_rows(agg, viewer=g, months=MonthRange(), snapshot=snap)}
    assert rows["gjilan"]["identified"] == 3 and rows["gjilan"]["per_10000"] > 0 and rows["gjilan"]["exact"]
    assert rows["prizren"]["identified"] == 10 and not rows["prizren"]["exact"]
    # months outside the range count nothing
    rows = {r["slug"]: r for r in service.municipality_rows(agg, viewer=g, months=MonthRange("2026-06", None),
                                                             snapshot=snap)}
    assert rows["gjilan"]["identified"] == 0


def test_csv_exports_have_one_row_per_municipality_and_stage():
    agg = _aggregate(8, 3)
    snap = _snapshot(agg)
    text = service.municipalities_csv(service.municipality_rows(agg, viewer=Viewer(None), months=MonthRange(),
                                                                snapshot=snap))
    got = list(csv.DictReader(io.StringIO(text)))
    assert len(got) == 38 and got[0].keys() == set(service.MUNICIPALITY_COLUMNS)
    f = service.funnel(agg, viewer=Viewer(None), municipality=None, months=MonthRange(), snapshot=snap)
    got = list(csv.DictReader(io.StringIO(service.funnel_csv(f))))
    assert len(got) == 7 * 39  # national + 38 municipalities
    assert {"municipality": "all", "stage": "identified", "count": "10"} in got  # 11, rounded
    assert {"municipality": "gjilan", "stage": "identified", "count": "c"} in got


def test_time_to_acknowledge_from_sketches():
    agg = c.Aggregate()
    for seconds in (60, 120, 180, 240, 300, 3600):
        agg.ack.setdefault(("prizren", ev.AgencyType.csw.value), c.LogHistogram()).add(seconds)
    out = service.time_to_acknowledge(agg, municipality=None)
    csw = next(a for a in out["agencies"] if a["agency"] == "csw")
    assert csw["acknowledged"] == 6
    assert 176 <= csw["median_seconds"] <= 244
    assert 290 <= csw["p90_seconds"] <= 3700
    police = next(a for a in out["agencies"] if a["agency"] == "police")
    assert police == {"agency": "police", "acknowledged": 0, "median_seconds": None, "p90_seconds": None}


def test_simplified_map_has_every_municipality_and_keeps_shapes_closed():
    square = [[0, 0], [0.5, 0.00001], [1, 0], [1, 1], [0, 1], [0, 0]]
    ring = geo.simplify_ring(square, tolerance=0.001)
    assert ring[0] == ring[-1] and [0.5, 0.0] not in ring and len(ring) == 5
    from services.analytics.views import STATIC_DIR
    data = json.loads((STATIC_DIR / "kosovo_municipalities.geojson").read_text())
    assert {f["properties"]["slug"] for f in data["features"]} == set(municipality_slugs())
    assert "CC BY-SA 2.0" in data["attribution"]
    for f in data["features"]:
        for poly in f["geometry"]["coordinates"]:
            assert all(r[0] == r[-1] and len(r) >= 4 for r in poly)
