"""Routing rules and the referral state machine, without I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.referral import states
from services.referral.rules import DEFAULT_RULES_FILE, RulesError, load_rules, parse_duration, parse_rules
from shared.events import (
    AgeBand,
    AgencyType,
    ReferralStatus,
    ReportSource,
    SchoolStatus,
    Sector,
)
from shared.reference import municipality_slugs
from tests import builders

AT = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
RULES = load_rules()
A = AgencyType


def routed(**case):
    return RULES.route(builders.case_identified(**case), at=AT)


def targets(**case) -> dict[AgencyType, object]:
    return {d.agency: d for d in routed(**case)}


# --- the packaged file --------------------------------------------------------------------------


def test_the_packaged_rule_file_validates_and_is_versioned():
    assert RULES.version >= 1
    ids = [r.id for r in RULES.rules]
    assert len(ids) == len(set(ids))
    assert all(r.legal_basis for r in RULES.rules)


# --- every starting rule --------------------------------------------------------------------------

QUIET = dict(compulsory_school_age=False, age_band=AgeBand.from_15_to_17,
             school_status=SchoolStatus.enrolled_attending, sector=Sector.agriculture,
             hazardous=False, worst_form=False, employer_involved=False,
             report_source=ReportSource.officer, reporter_agency=A.csw)


def test_every_identified_child_goes_to_csw_in_24h():
    got = targets(**QUIET)
    assert list(got) == [A.csw]
    d = got[A.csw]
    assert d.deadline_in == timedelta(hours=24) and d.deadline == AT + timedelta(hours=24)
    assert d.rule_id == "csw-every-child" and d.rule_version == RULES.version
    assert d.priority == "high"


def test_a_worst_form_goes_to_csw_within_2h_urgent():
    d = targets(**{**QUIET, "worst_form": True})[A.csw]
    assert d.deadline_in == timedelta(hours=2) and d.priority == "urgent"


@pytest.mark.parametrize("extra", [
    dict(compulsory_school_age=True),
    dict(school_status=SchoolStatus.dropped_out),
    dict(school_status=SchoolStatus.never_enrolled),
])
def test_compulsory_school_age_or_out_of_school_goes_to_education_in_72h(extra):
    d = targets(**{**QUIET, **extra})[A.education]
    assert d.deadline_in == timedelta(hours=72)
    assert d.rule_id == "education-school-age-or-out-of-school"


def test_a_15_year_old_attending_school_does_not_go_to_education():
    assert A.education not in targets(**QUIET)


@pytest.mark.parametrize("extra,deadline,priority", [
    (dict(employer_involved=True), timedelta(days=5), "normal"),
    (dict(sector=Sector.construction), timedelta(days=5), "normal"),
    (dict(employer_involved=True, hazardous=True), timedelta(hours=24), "high"),
])
def test_a_workplace_goes_to_the_labour_inspectorate(extra, deadline, priority):
    d = targets(**{**QUIET, **extra})[A.labour_inspectorate]
    assert (d.deadline_in, d.priority) == (deadline, priority)
    assert d.office_id == "labour_inspectorate.prizren"


@pytest.mark.parametrize("sector", [Sector.trafficking, Sector.commercial_sexual_exploitation,
                                    Sector.illicit_activities])
def test_trafficking_and_other_worst_forms_go_to_police_and_prosecution_in_2h(sector):
    got = targets(**{**QUIET, "sector": sector, "worst_form": True})
    assert {A.csw, A.police, A.prosecution} <= set(got)
    for agency in (A.police, A.prosecution, A.csw):
        assert got[agency].deadline_in == timedelta(hours=2)
        assert got[agency].priority == "urgent"
    assert got[A.prosecution].office_id == "prosecution.prizren"


def test_forced_begging_goes_to_police_but_begging_alone_does_not():
    assert A.police in targets(**{**QUIET, "sector": Sector.begging, "worst_form": True})
    assert A.police not in targets(**{**QUIET, "sector": Sector.begging})


@pytest.mark.parametrize("extra", [dict(report_source=ReportSource.citizen),
                                   dict(report_source=ReportSource.ngo),
                                   dict(reporter_agency=A.ngo)])
def test_a_citizen_or_ngo_report_goes_to_police_for_verification_in_24h(extra):
    d = targets(**{**QUIET, **extra})[A.police]
    assert d.rule_id == "police-verify-citizen-report"
    assert d.deadline_in == timedelta(hours=24)


# --- the cases of the issue -----------------------------------------------------------------------


def test_a_12_year_old_collecting_scrap_metal_in_prizren_goes_to_csw_and_education_prizren():
    got = routed(municipality="prizren", age_band=AgeBand.from_10_to_14, compulsory_school_age=True,
                 school_status=SchoolStatus.dropped_out, sector=Sector.scrap_metal_waste,
                 hazardous=True, worst_form=False, employer_involved=False,
                 report_source=ReportSource.officer, reporter_agency=A.police)
    assert [(d.agency, d.office_id) for d in got] == [(A.csw, "csw.prizren"),
                                                     (A.education, "education.prizren")]


def test_a_12_year_old_in_street_work_in_prizren_goes_to_csw_and_education():
    got = targets(municipality="prizren", age_band=AgeBand.from_10_to_14, compulsory_school_age=True,
                  sector=Sector.street_work, hazardous=False, employer_involved=False)
    assert set(got) == {A.csw, A.education}


def test_a_16_year_old_on_a_construction_site_goes_to_csw_and_the_labour_inspectorate():
    got = targets(municipality="ferizaj", age_band=AgeBand.from_15_to_17, compulsory_school_age=False,
                  school_status=SchoolStatus.enrolled_irregular, sector=Sector.construction,
                  hazardous=True, employer_involved=True, worst_form=False)
    assert set(got) == {A.csw, A.labour_inspectorate}
    assert got[A.labour_inspectorate].deadline_in == timedelta(hours=24)
    assert got[A.labour_inspectorate].office_id == "labour_inspectorate.ferizaj"


def test_a_citizen_reporting_trafficking_gets_one_police_referral_with_the_earliest_deadline():
    got = routed(sector=Sector.trafficking, worst_form=True, report_source=ReportSource.citizen)
    police = [d for d in got if d.agency is A.police]
    assert len(police) == 1, "two rules hit the police: still one referral"
    assert police[0].deadline_in == timedelta(hours=2) and police[0].priority == "urgent"
    assert police[0].rule_id == "police-worst-forms"
    assert set(police[0].matched_rules) == {"police-worst-forms", "police-verify-citizen-report"}
    assert got[0].deadline_in <= got[-1].deadline_in, "most pressing first"


# --- properties -----------------------------------------------------------------------------------

cases = st.builds(
    builders.case_identified,
    municipality=st.sampled_from(sorted(municipality_slugs())),
    age_band=st.sampled_from(AgeBand),
    compulsory_school_age=st.booleans(),
    school_status=st.sampled_from(SchoolStatus),
    sector=st.sampled_from(Sector),
    hazardous=st.booleans(),
    worst_form=st.booleans(),
    employer_involved=st.booleans(),
    report_source=st.sampled_from(ReportSource),
    reporter_agency=st.sampled_from([a for a in AgencyType if a is not A.coordinator]),
)


@settings(max_examples=300, deadline=None)
@given(case=cases)
def test_every_child_gets_a_csw_referral_and_no_agency_twice(case):
    got = RULES.route(case, at=AT)
    agencies = [d.agency for d in got]
    assert A.csw in agencies
    assert len(agencies) == len(set(agencies))
    for d in got:
        assert d.office_id == f"{d.agency.value}.{case.municipality}"
        assert d.deadline > AT
        assert d.legal_basis


SEEN = load_rules()  # one rule set routing every example: it remembers the shapes it has seen
RULES_TEXT = DEFAULT_RULES_FILE.read_text(encoding="utf-8")


@settings(max_examples=300, deadline=None)
@given(case=cases, at=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1),
                                   timezones=st.just(timezone.utc)))
def test_a_case_is_routed_as_a_fresh_rule_set_routes_it_whatever_was_routed_before(case, at):
    """Routing remembers its decisions per case shape (issue 18); a remembered decision is the
    fresh one, with the deadline counted from this case's own identification time."""
    fresh = parse_rules(RULES_TEXT).route(case, at=at)
    assert SEEN.route(case, at=at) == fresh
    day_later = [replace(d, deadline=d.deadline + timedelta(days=1)) for d in fresh]
    assert SEEN.route(case, at=at + timedelta(days=1)) == day_later


# --- invalid files --------------------------------------------------------------------------------

GOOD = """
version: 3
rules:
  - id: csw-all
    when: {}
    target: csw
    deadline: 24h
    priority: high
    legal_basis: Law
"""


def test_a_minimal_file_validates_and_tiny_deadlines_are_allowed():
    rs = parse_rules(GOOD.replace("24h", "2s"))
    assert rs.version == 3 and rs.rules[0].deadline == timedelta(seconds=2)


@pytest.mark.parametrize("change,needle", [
    (("target: csw", "target: fire_brigade"), "rule 'csw-all' field target"),
    (("deadline: 24h", "deadline: tomorrow"), "rule 'csw-all' field deadline"),
    (("deadline: 24h", "deadline: 0h"), "must be positive"),
    (("priority: high", "priority: asap"), "rule 'csw-all' field priority"),
    (("when: {}", "when: {sector: knitting}"), "rule 'csw-all' field when.sector"),
    (("when: {}", "when: {shoe_size: 3}"), "rule 'csw-all' field when.shoe_size"),
    (("when: {}", "when: {any: []}"), "rule 'csw-all' field when.any"),
    (("when: {}", "when: {municipality: atlantis}"), "unknown municipality 'atlantis'"),
    (("target: csw", "target: coordinator"), "escalations"),
    (("    legal_basis: Law\n", ""), "rule 'csw-all' field legal_basis"),
    (("  - id: csw-all\n", "  - when2: 1\n"), "rule #1 (no id)"),
    (("version: 3", "version: zero"), "version"),
])
def test_an_invalid_rule_file_names_the_rule_and_the_field(change, needle):
    with pytest.raises(RulesError) as err:
        parse_rules(GOOD.replace(*change), source="rules.yaml")
    assert needle in str(err.value)
    assert "rules.yaml" in str(err.value)


def test_duplicate_ids_and_bad_yaml_are_reported():
    dup = GOOD + GOOD.split("rules:\n")[1]
    with pytest.raises(RulesError, match="rule 'csw-all' field id: duplicate"):
        parse_rules(dup)
    with pytest.raises(RulesError, match="not valid YAML"):
        parse_rules("version: [1\n")


def test_a_missing_file_is_a_rules_error(tmp_path):
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_override_errors_name_the_override():
    text = GOOD.replace("    legal_basis: Law", "    overrides:\n      - when: {worst_form: maybe}\n"
                        "        deadline: 2h\n    legal_basis: Law")
    with pytest.raises(RulesError, match=r"rule 'csw-all' field overrides\.0\.when\.worst_form"):
        parse_rules(text)


@pytest.mark.parametrize("text,delta", [("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)),
                                        ("2h", timedelta(hours=2)), ("5d", timedelta(days=5))])
def test_durations(text, delta):
    assert parse_duration(text) == delta


# --- state machine --------------------------------------------------------------------------------

S = ReferralStatus


def test_the_happy_path():
    s = S.pending
    for action, expected in [("acknowledge", S.acknowledged), ("accept", S.accepted),
                             ("complete", S.completed)]:
        s = states.next_status(s, action)
        assert s is expected
    assert states.next_status(S.acknowledged, "decline") is S.declined


@pytest.mark.parametrize("current,action", [
    (S.pending, "accept"), (S.pending, "decline"), (S.pending, "complete"),
    (S.acknowledged, "acknowledge"), (S.acknowledged, "complete"),
    (S.accepted, "decline"), (S.accepted, "acknowledge"),
    (S.declined, "complete"), (S.declined, "accept"), (S.completed, "acknowledge"),
    (S.closed, "accept"), (S.completed, "close"),
])
def test_illegal_transitions_name_the_current_status(current, action):
    with pytest.raises(states.IllegalTransition) as err:
        states.next_status(current, action)
    assert f"that is {current.value}" in str(err.value)
    assert err.value.current is current


def test_every_status_is_reachable_and_terminal_ones_have_no_way_out():
    reachable = {S.pending}
    for (_, _), to in states.TRANSITIONS.items():
        reachable.add(to)
    assert reachable == set(S)
    for s in states.TERMINAL:
        assert states.legal_actions(s) == []


def test_overdue_means_still_waiting_for_an_answer_at_the_deadline():
    deadline = AT + timedelta(hours=2)
    assert not states.is_overdue(S.pending, deadline, AT)
    assert states.is_overdue(S.pending, deadline, deadline)
    assert states.is_overdue(S.acknowledged, deadline, deadline + timedelta(seconds=1))
    for s in (S.accepted, S.declined, S.completed, S.closed):
        assert not states.is_overdue(s, deadline, deadline + timedelta(days=1))
    assert states.within_deadline(deadline, deadline)
    assert not states.within_deadline(deadline, deadline + timedelta(microseconds=1))


def test_the_service_refuses_to_start_with_an_invalid_rule_file(tmp_path):
    from services.referral.app import create_app
    from shared.settings import Settings

    bad = tmp_path / "rules.yaml"
    bad.write_text(GOOD.replace("target: csw", "target: csw_office"), encoding="utf-8")
    with pytest.raises(RulesError, match=r"rule 'csw-all' field target"):
        create_app(Settings(_env_file=None, REFERRAL_RULES_FILE=str(bad)))
    good = tmp_path / "good.yaml"
    good.write_text(GOOD, encoding="utf-8")
    app = create_app(Settings(_env_file=None, REFERRAL_RULES_FILE=str(good)))
    assert app.state.rules.version == 3
