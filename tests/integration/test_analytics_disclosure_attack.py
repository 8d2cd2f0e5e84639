"""An outsider without a token attacks the real analytics service (real broker, real HTTP server,
public API and live stream) the way issue 15 did, and learns nothing:

- subtraction: the national total minus the visible municipalities, and a municipality's total
  minus its visible breakdown cells, never narrow a suppressed cell to fewer than three values;
- differencing: one new case in a small municipality (Mamushe) changes nothing in the public
  view within the publication period (API and stream), and after the next publication only its
  total and funnel figures (the same whatever the child's sex, community, age band, sector or
  reporting agency) may differ: no breakdown, referral or time figure of Mamushe exists publicly.

The attacker's arithmetic is written here from the published rules only ("c" = suppressed,
any other figure a multiple of 5 rounded from at most 2 away), not taken from the service.

The attack runs once per module (`attack`, below: one service, two publications around the new
case, about 20 s); each test then checks one behaviour on what the outsider saw, so a failure
names what broke. The fixture only sets the scene and records; the assertions are the tests'."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime

import httpx
import pytest

from services.analytics.app import create_app
from shared import events as ev
from shared.kafka import make_producer, send_envelope
from shared.topics import Topics
from tests import builders
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.integration.test_analytics_live import _next_counts, served
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

EVERY_S = 6.0  # publication period in this test (daily in production)


def _case(muni: str, *, sex=ev.Sex.male, community=ev.Community.albanian, age=ev.AgeBand.from_10_to_14,
          work=(ev.Sector.street_work, "car_washing"), agency=ev.AgencyType.police, hazardous=False):
    return builders.envelope(builders.case_identified(
        municipality=muni, sex=sex, community=community, age_band=age, sector=work[0], activity=work[1],
        reporter_agency=agency, hazardous=hazardous, identified_on=date(2026, 3, 3)))


def _world() -> list:
    """Mamushe: 6 children, one girl, one Roma, one in hazardous work (the issue's example);
    Prizren: 1 child (the issue's hidden "<5"); Prishtine: 23 children (breakdowns offered, one
    girl and one Ashkali among them); Gjilan 7, Peje 12."""
    cases = [_case("mamushe") for _ in range(3)]
    cases += [_case("mamushe", sex=ev.Sex.female), _case("mamushe", community=ev.Community.roma),
              _case("mamushe", hazardous=True, work=(ev.Sector.agriculture, "pesticide_handling"))]
    cases += [_case("prizren")]
    cases += [_case("prishtine") for _ in range(21)]
    cases += [_case("prishtine", sex=ev.Sex.female), _case("prishtine", community=ev.Community.ashkali)]
    cases += [_case("gjilan") for _ in range(7)] + [_case("peje") for _ in range(12)]
    return cases


def _bounds(p) -> tuple[float, float]:
    """What the attacker knows from one published figure (1 to 5 are never shown, so a published
    5 means 6 or 7)."""
    if p == "c":
        return 0, math.inf
    return (0, 0) if p == 0 else (max(6, p - 2), p + 2)


def _candidates_by_subtraction(margin, cells: dict, key: str) -> list[int]:
    """Values 0..5 of cells[key] consistent with margin = sum(cells), every figure at its bounds."""
    m_lo, m_hi = (1, 5) if margin == "c" else _bounds(margin)
    others = [_bounds(p) for k, p in cells.items() if k != key]
    lo = m_lo - sum(h for _, h in others)
    hi = m_hi - sum(lo_ for lo_, _ in others)
    return [v for v in range(0, 6) if lo <= v <= hi]


def _safe(candidates: list[int]) -> bool:
    """The attacker learns nothing about a child: at least three values stay possible, or the
    published figures prove the cell is 0 (e.g. under a national 0: no child to single out)."""
    return len(candidates) >= 3 or candidates == [0]


def _as_of(doc: dict) -> float:
    return datetime.fromisoformat(doc["as_of"]).timestamp()


async def _public(http: httpx.AsyncClient, base: str) -> dict:
    """Everything the public API offers about the country and Mamushe."""
    out = {}
    for name, path in (("list", "/v1/counts/municipalities"), ("funnel", "/v1/funnel"),
                       ("mamushe", "/v1/counts/municipalities/mamushe"),
                       ("mamushe_funnel", "/v1/funnel?municipality=mamushe"),
                       ("prishtine", "/v1/counts/municipalities/prishtine")):
        r = await http.get(base + path)
        assert r.status_code == 200, (path, r.text)
        out[name] = r.json()
    r = await http.get(base + "/v1/export/municipalities/mamushe.csv")
    out["mamushe_csv"] = r.text
    return out


def _diff(a, b, path="") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = set()
        for i, (x, y) in enumerate(zip(a, b)):
            key = x.get("slug") or x.get("stage") if isinstance(x, dict) else str(i)
            out |= _diff(x, y, f"{path}/{key}")
        return out
    return set() if a == b else {path}


@dataclass(frozen=True)
class Attack:
    """What the outsider (and, for contrast, Mamushe's coordinator) saw; read-only for the tests."""
    http: httpx.AsyncClient  # no token; the service stays up for the module
    base: str
    before: dict  # the public view right after a publication
    before_reread: dict  # the same, read again at once
    first_streamed: dict  # the stream's first message, opened before the new case
    coordinator_view: dict | None  # Mamushe's coordinator's counts once the new case is live (None: never)
    within: dict  # the public view once the coordinator sees the new case
    streamed_before_publication: list[dict]  # stream messages dated before the case was live
    streamed_after: dict | None  # the first stream message dated after (None: none came in time)
    after: dict  # the public view after the publication that follows the new case


NEW_CASE = dict(sex=ev.Sex.female, community=ev.Community.egyptian, age=ev.AgeBand.from_15_to_17,
                work=(ev.Sector.agriculture, "pesticide_handling"), agency=ev.AgencyType.labour_inspectorate,
                hazardous=True)  # a girl, Egyptian, 15-17, hazardous agriculture, labour inspectorate


@pytest.fixture(scope="module")
async def attack(module_env) -> AsyncIterator[Attack]:
    env = module_env
    topics = Topics(env.topic_prefix)
    world = _world()
    await produce(env, topics.case_events, [(e.key, e.to_json_bytes()) for e in world])
    national = bearer(env, sub="coordinator.national", agency="coordinator", municipality="*", roles=["coordinator"])
    mamushe_coordinator = bearer(env, sub="coordinator.mamushe", agency="coordinator", municipality="mamushe",
                                 roles=["coordinator"])
    app = create_app(env.model_copy(update={"analytics_publish_every_s": EVERY_S, "analytics_publish_lag_s": 0.0}))
    async with running(app) as client, served(app) as base, httpx.AsyncClient(timeout=20) as http:
        async def folded(n):
            r = await client.get("/v1/funnel", headers=national)
            return r.json()["stages"][0]["count"] == n
        await wait_until(lambda: folded(len(world)), timeout_s=45, what="every case folded")
        t_folded = time.time()

        async def published_after(t):
            r = await http.get(base + "/v1/counts/municipalities")
            return r.json() if _as_of(r.json()) >= t else None
        await wait_until(lambda: published_after(t_folded), timeout_s=3 * EVERY_S, what="a publication of them all")
        # right after a publication, so that the new case below lands within one period
        before = await _public(http, base)
        as_of = _as_of(before["list"])
        await wait_until(lambda: published_after(as_of + 1), timeout_s=3 * EVERY_S, what="the next publication")
        before = await _public(http, base)
        before_reread = await _public(http, base)

        # the new case in Mamushe, watched on the public stream and API
        async with http.stream("GET", base + "/v1/stream") as stream:
            lines = stream.aiter_lines()
            first = await asyncio.wait_for(_next_counts(lines), 10)
            producer = make_producer(env)
            await producer.start()
            try:
                await send_envelope(producer, topics.case_events, _case("mamushe", **NEW_CASE))
            finally:
                await producer.stop()

            async def coordinator_sees_it():  # exact and live within the coordinator's scope
                r = await client.get("/v1/counts/municipalities/mamushe", headers=mamushe_coordinator)
                doc = r.json()
                seen = doc["identified"] == 7 and doc["breakdowns"]["sex"]["female"] == 2
                return doc if seen else None
            try:
                coordinator_view = await wait_until(coordinator_sees_it, timeout_s=20,
                                                    what="the coordinator to see the new case live")
            except AssertionError:
                coordinator_view = None
            t_new = time.time()
            within = await _public(http, base)

            # every message the stream sends before the case is published; then the first after
            streamed_before, streamed_after = [], None
            try:
                while True:
                    msg = await asyncio.wait_for(_next_counts(lines), 3 * EVERY_S)
                    if _as_of(msg) >= t_new:
                        streamed_after = msg
                        break
                    streamed_before.append(msg)
            except asyncio.TimeoutError:
                pass

        await wait_until(lambda: published_after(t_new), timeout_s=3 * EVERY_S, what="the publication after the case")
        after = await _public(http, base)
        yield Attack(http=http, base=base, before=before, before_reread=before_reread, first_streamed=first,
                     coordinator_view=coordinator_view, within=within,
                     streamed_before_publication=streamed_before, streamed_after=streamed_after, after=after)


def _stages(a: Attack) -> list[str]:
    return [s["stage"] for s in a.before["funnel"]["stages"]]


# --- the public view between publications -------------------------------------------------------

async def test_the_public_view_is_the_same_on_a_second_read(attack):
    assert attack.before["list"]["municipalities"] == attack.before_reread["list"]["municipalities"]


# --- subtraction 1: the national total minus the visible municipalities ----------------------------

async def test_the_national_total_is_rounded_and_a_one_child_municipality_hidden(attack):
    rows = {m["slug"]: m for m in attack.before["list"]["municipalities"]}
    assert attack.before["funnel"]["stages"][0]["count"] == 50  # 51 children, rounded: never the exact total
    assert rows["prizren"]["identified"] == "c"


async def test_no_hidden_municipality_is_narrowed_by_subtracting_from_the_national_total(attack):
    rows = {m["slug"]: m for m in attack.before["list"]["municipalities"]}
    national_identified = attack.before["funnel"]["stages"][0]["count"]
    cells = {s: m["identified"] for s, m in rows.items()}
    hidden = [s for s, p in cells.items() if p == "c"]
    assert hidden  # the attack has something to recover
    for s in hidden:
        assert len(_candidates_by_subtraction(national_identified, cells, s)) >= 3, s  # nonzero margin


async def test_no_hidden_municipality_is_narrowed_at_any_funnel_stage(attack):
    rows = {m["slug"]: m for m in attack.before["list"]["municipalities"]}
    for stage in attack.before["funnel"]["stages"]:
        col = {s: m[stage["stage"]] if stage["stage"] != "identified" else m["identified"] for s, m in rows.items()}
        for s in [s for s, p in col.items() if p == "c"]:
            assert _safe(_candidates_by_subtraction(stage["count"], col, s)), (stage, s)


# --- subtraction 2: a municipality's total minus its visible breakdown cells -----------------------

async def test_a_small_municipality_publishes_its_total_only(attack):
    mamushe = attack.before["mamushe"]
    assert mamushe["identified"] == 5 and mamushe["breakdowns"] is None and mamushe["by_month"] is None
    assert mamushe["referrals"] is None
    assert "breakdown" not in attack.before["mamushe_csv"]


async def test_no_hidden_breakdown_cell_is_narrowed_by_subtracting_from_a_municipality_total(attack):
    prishtine = attack.before["prishtine"]
    assert prishtine["identified"] == 25 and prishtine["breakdowns_offered"]
    for dim, vals in prishtine["breakdowns"].items():
        assert all(p == "c" or p % 5 == 0 for p in vals.values()), dim
        for v in [v for v, p in vals.items() if p == "c"]:
            assert _safe(_candidates_by_subtraction(prishtine["identified"], vals, v)), (dim, v)
    assert prishtine["breakdowns"]["sex"]["female"] == "c"
    assert prishtine["breakdowns"]["community"]["ashkali"] == "c"


async def test_referral_times_and_month_ranges_are_not_public(attack):
    http, base = attack.http, attack.base
    assert (await http.get(base + "/v1/time-to-acknowledge?municipality=mamushe")).status_code == 401
    assert (await http.get(base + "/v1/counts/municipalities/mamushe?from=2026-03&to=2026-03")).status_code == 401


# --- differencing: one new case in Mamushe ------------------------------------------------------------

async def test_the_coordinator_sees_the_new_case_exactly_and_live(attack):
    assert attack.coordinator_view is not None, "Mamushe's coordinator never saw 7 children, 2 of them girls"


async def test_a_new_case_changes_nothing_in_the_public_api_before_the_next_publication(attack):
    checked_within = _as_of(attack.within["list"]) == _as_of(attack.before["list"])
    assert checked_within, "the new case was not folded within one publication period; raise EVERY_S"
    assert attack.within == attack.before


async def test_the_stream_pushes_only_the_old_view_until_the_next_publication(attack):
    before = attack.before
    assert attack.first_streamed["municipalities"] == before["list"]["municipalities"]
    allowed = {"/mamushe/identified", "/mamushe/per_10000"} | {f"/mamushe/{s}" for s in _stages(attack)}
    for msg in attack.streamed_before_publication:
        assert _diff(msg["municipalities"], before["list"]["municipalities"]) <= allowed
    assert attack.streamed_after is not None, "the stream sent no publication after the new case"


async def test_after_the_next_publication_only_mamushe_total_and_funnel_figures_change(attack):
    stages = _stages(attack)
    allowed = {"/list/as_of", "/funnel/as_of", "/mamushe/as_of", "/mamushe_funnel/as_of", "/prishtine/as_of",
               "/mamushe_csv"}
    allowed |= {"/list/municipalities/mamushe/identified", "/list/municipalities/mamushe/per_10000"}
    allowed |= {f"/list/municipalities/mamushe/{s}" for s in stages}
    allowed |= {f"/funnel/stages/{s}/count" for s in stages} | {f"/funnel/municipalities/mamushe/{s}" for s in stages}
    allowed |= {"/mamushe/identified"} | {f"/mamushe/funnel/{s}" for s in stages}
    allowed |= {f"/mamushe_funnel/stages/{s}/count" for s in stages}
    changed = _diff(attack.before, attack.after)
    assert changed <= allowed, sorted(changed - allowed)


async def test_after_the_next_publication_mamushe_figures_say_nothing_of_the_child(attack):
    # the figures that may change are the same whatever the child's attributes: no breakdown
    before, after = attack.before, attack.after
    assert after["mamushe"]["breakdowns"] is None and after["mamushe"]["by_month"] is None
    assert after["mamushe"]["identified"] == 5  # 7 children, rounded
    assert after["prishtine"] == {**before["prishtine"], "as_of": after["prishtine"]["as_of"]}
    assert "breakdown" not in after["mamushe_csv"] and "referrals" not in after["mamushe_csv"]
