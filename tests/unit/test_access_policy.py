"""The access policy file (shared/access_policy.yaml) and its pure module (shared/access.py):
validation names what is wrong, roles are bound to agencies, scopes nest, the close rule, and
the README's matrix is the rendering of the file."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from shared import access
from shared.access import POLICY_FILE, PolicyError, Resource, parse, policy, render_matrix
from shared.auth import Claims
from shared.events import AgencyType

ROOT = Path(__file__).resolve().parents[2]
KNOWN = [a.value for a in AgencyType]


def raw() -> dict:
    return yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))


def who(agency: str, municipality: str = "prizren", *roles: str, sub: str | None = None) -> Claims:
    return Claims(sub=sub or f"{agency}.{municipality}.x", agency=agency, municipality=municipality, roles=roles)


def case(municipality="prizren", reporter=("police", "prizren"), holders=(), **facts) -> Resource:
    return Resource(municipality=municipality, offices=frozenset({reporter, *holders}), facts=facts)


def test_the_bundled_policy_loads_and_knows_every_agency():
    p = policy()
    assert set(p.agencies) == set(KNOWN)
    assert p.lead_agency == "csw"


@pytest.mark.parametrize("mutate,named", [
    (lambda d: d["roles"].__setitem__("reporter", ["police", "firebrigade"]), "firebrigade"),
    (lambda d: d["actions"]["case.read"]["grants"].append(
        {"agencies": ["police"], "roles": ["janitor"], "scope": "own_office"}), "janitor"),
    (lambda d: d["routes"]["intake"].__setitem__("GET /v1/x", "case.delete"), "case.delete"),
    (lambda d: d["case_events"].__setitem__("closed", "case.shut"), "case.shut"),
    (lambda d: d["actions"]["case.read"]["grants"].append(
        {"agencies": ["police"], "roles": ["caseworker"], "scope": "galaxy"}), "galaxy"),
    # a grant contradicting the role binding: coordinator role on the police
    (lambda d: d["actions"]["case.read"]["grants"].append(
        {"agencies": ["police"], "roles": ["coordinator"], "scope": "own_municipality"}), "coordinator"),
    (lambda d: d.__setitem__("agencies", [*d["agencies"], "ministry"]), "ministry"),
])
def test_an_unknown_name_is_an_error_naming_it(mutate, named):
    d = copy.deepcopy(raw())
    mutate(d)
    with pytest.raises(PolicyError, match=re.escape(repr(named))):
        parse(d, agencies_known=KNOWN)


def test_a_bad_file_stops_a_service_at_start(tmp_path, monkeypatch):
    bad = tmp_path / "access_policy.yaml"
    d = raw()
    d["roles"]["coordinator"] = ["coordinator", "martians"]
    bad.write_text(yaml.safe_dump(d, sort_keys=False))
    monkeypatch.setattr(access, "POLICY_FILE", bad)
    access.policy.cache_clear()
    try:
        from services.analytics.app import create_app
        from shared.settings import Settings

        with pytest.raises(PolicyError, match="unknown agency 'martians'"):
            create_app(Settings())
    finally:
        monkeypatch.undo()
        access.policy.cache_clear()


def test_a_role_the_agency_may_not_hold_gives_nothing():
    p = policy()
    labour_as_coordinator = who("labour_inspectorate", "prizren", "coordinator")
    assert p.effective_roles(labour_as_coordinator) == frozenset()
    d = p.allowed(labour_as_coordinator, "case.read", case())
    assert not d and d.status == 403
    assert "role 'coordinator' gives nothing to labour_inspectorate" in d.reason
    police_as_coordinator = who("police", "prishtine", "coordinator", "caseworker")
    assert not p.allowed(police_as_coordinator, "case.read", case(reporter=("csw", "prizren")))
    assert not p.allowed(who("ngo", "*", "analyst"), "analytics.exact", Resource(municipality=None))
    assert not who("police", "prizren", "coordinator").is_coordinator
    assert who("coordinator", "prizren", "coordinator").is_coordinator


def test_scopes_nest_from_own_office_to_national():
    p = policy()
    # an officer reads a case of their office (reporting or holding a referral), not a neighbour's
    assert p.allowed(who("police", "prizren", "caseworker"), "case.read", case())
    assert not p.allowed(who("csw", "prizren", "caseworker"), "case.read", case())
    assert p.allowed(who("csw", "prizren", "caseworker"), "case.read", case(holders=[("csw", "prizren")]))
    assert not p.allowed(who("police", "gjakove", "caseworker"), "case.read", case())
    # the coordinator: their municipality; "*": every municipality and national sums
    assert p.allowed(who("coordinator", "prizren", "coordinator"), "case.read", case())
    assert not p.allowed(who("coordinator", "gjakove", "coordinator"), "case.read", case())
    assert p.allowed(who("coordinator", "*", "coordinator"), "case.read", case())
    assert not p.allowed(who("coordinator", "prizren", "coordinator"), "analytics.exact", Resource())
    assert p.allowed(who("coordinator", "*", "analyst"), "analytics.exact", Resource())
    # public
    d = p.allowed(None, "case.read", case())
    assert not d and d.status == 401
    assert p.allowed(None, "analytics.published", Resource())
    # an inbox is its owner's
    assert p.allowed(who("csw", "prizren", "duty_officer", sub="a"), "inbox.read", Resource(owner="a"))
    assert not p.allowed(who("csw", "prizren", "duty_officer", sub="a"), "inbox.read", Resource(owner="b"))


def test_closing_a_case_has_its_own_rule():
    p = policy()
    trafficking = case(reporter=("ngo", "prizren"), worst_form=True, open_referral_agencies=["police", "csw"])
    ngo_reporter = who("ngo", "prizren", "reporter", "caseworker", "supervisor")
    d = p.allowed(ngo_reporter, "case.close", trafficking)
    assert not d and d.status == 403
    csw_caseworker = who("csw", "prizren", "caseworker", "duty_officer")
    assert p.allowed(csw_caseworker, "case.close", trafficking).status == 403
    csw_supervisor = who("csw", "prizren", "supervisor")
    d = p.allowed(csw_supervisor, "case.close", trafficking)
    assert not d and d.status == 409 and "police referral is still open" in d.reason
    d = p.allowed(csw_supervisor, "case.close", case(worst_form=True, open_referral_agencies=["police"],
                                                     override_reason="decided at the case conference"))
    assert d.status == 409  # only the coordinator may override
    coordinator = who("coordinator", "prizren", "coordinator")
    d = p.allowed(coordinator, "case.close", trafficking)
    assert d.status == 409 and "override_reason" in d.reason
    d = p.allowed(coordinator, "case.close", case(worst_form=True, open_referral_agencies=["police"],
                                                  override_reason="decided at the case conference"))
    assert d and d.overridden
    # not a worst form, or nothing open: the lead agency's supervisor closes
    assert p.allowed(csw_supervisor, "case.close", case(worst_form=False, open_referral_agencies=["police"]))
    assert p.allowed(csw_supervisor, "case.close", case(worst_form=True, open_referral_agencies=["csw"]))
    assert not p.allowed(who("csw", "gjakove", "supervisor"), "case.close", case())


def test_changing_hazardous_or_the_sector_needs_the_reclassify_rule():
    p = policy()
    assert p.case_event_actions("updated", ["hazardous"]) == ["case.update", "case.reclassify"]
    assert p.case_event_actions("case.updated", []) == ["case.update"]
    assert p.case_event_actions("closed") == ["case.close"]
    mine = case(reporter=("police", "prizren"))
    assert p.allowed(who("police", "prizren", "caseworker"), "case.update", mine)
    assert not p.allowed(who("police", "prizren", "caseworker"), "case.reclassify", mine)
    assert p.allowed(who("police", "prizren", "supervisor"), "case.reclassify", mine)
    assert p.allowed(who("labour_inspectorate", "prizren", "caseworker"), "case.reclassify",
                     case(holders=[("labour_inspectorate", "prizren")]))


def test_the_readme_matrix_is_the_rendering_of_the_policy_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = access.README_BEGIN, access.README_END
    assert begin in readme and end in readme, "README lacks the access matrix markers"
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == render_matrix(), "README's access matrix is stale: run `python -m shared.access --readme README.md`"


def test_the_policy_module_is_pure():
    import subprocess
    import sys

    code = ("import sys, shared.access as a; a.policy(); "
            "bad = [m for m in ('fastapi', 'starlette', 'faust', 'asyncpg', 'aiokafka') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
