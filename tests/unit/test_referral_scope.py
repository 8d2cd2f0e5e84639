"""Who sees and acts on which referrals (pure policy, no I/O)."""

from __future__ import annotations

import pytest

from services.referral.rules import Filters, may_handle, scoped_filters
from shared.errors import Forbidden
from shared.auth import Claims
from shared.events import AgencyType


def claims(agency: str, municipality: str, *roles: str) -> Claims:
    return Claims(sub=f"{agency}.{municipality}.x", agency=agency, municipality=municipality, roles=roles)


def test_a_caseworker_is_narrowed_to_their_agency_and_municipality():
    f = scoped_filters(claims("csw", "prizren", "caseworker"), Filters())
    assert (f.agency, f.municipality) == (AgencyType.csw, "prizren")


def test_a_coordinator_sees_every_agency_of_their_municipality():
    f = scoped_filters(claims("coordinator", "prizren", "coordinator"), Filters(agency=AgencyType.police))
    assert (f.agency, f.municipality) == (AgencyType.police, "prizren")
    national = scoped_filters(claims("coordinator", "*", "coordinator"), Filters(municipality="peje"))
    assert national.municipality == "peje"


@pytest.mark.parametrize("who,asked", [
    (claims("csw", "prizren", "caseworker"), Filters(agency=AgencyType.police)),
    (claims("csw", "prizren", "duty_officer"), Filters(municipality="peje")),
    (claims("coordinator", "prizren", "coordinator"), Filters(municipality="peje")),
    (claims("police", "prizren", "reporter"), Filters()),
    (claims("ngo", "prizren", "analyst"), Filters()),
])
def test_asking_beyond_your_scope_is_forbidden_not_empty(who, asked):
    with pytest.raises(Forbidden):
        scoped_filters(who, asked)


def test_who_may_act_on_a_referral():
    target = dict(agency="csw", municipality="prizren")
    assert may_handle(claims("csw", "prizren", "supervisor"), **target)
    assert may_handle(claims("coordinator", "prizren", "coordinator"), **target)
    assert not may_handle(claims("csw", "peje", "caseworker"), **target)
    assert not may_handle(claims("education", "prizren", "caseworker"), **target)
    assert not may_handle(claims("csw", "prizren", "reporter"), **target)
    assert not may_handle(claims("coordinator", "peje", "coordinator"), **target)
