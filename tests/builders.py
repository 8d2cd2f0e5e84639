"""Builders for test data: every call returns a new, valid object; override what the test is about."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any

from shared import events as ev


def case_identified(**overrides: Any) -> ev.CaseIdentified:
    data: dict[str, Any] = dict(
        case_id=uuid.uuid4(),
        municipality="prizren",
        child_ref="cr_" + uuid.uuid4().hex,
        identified_on=date.today(),
        reporter_agency=ev.AgencyType.police,
        report_source=ev.ReportSource.officer,
        reported_by="police.prizren.duty",
        age_band=ev.AgeBand.from_10_to_14,
        compulsory_school_age=True,
        sex=ev.Sex.male,
        community=ev.Community.roma,
        school_status=ev.SchoolStatus.dropped_out,
        sector=ev.Sector.scrap_metal_waste,
        activity="scrap_collection",
        hazardous=True,
        worst_form=False,
        employer_involved=False,
    )
    data.update(overrides)
    return ev.CaseIdentified(**data)


def _referral_base(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        referral_id=uuid.uuid4(), case_id=uuid.uuid4(), municipality="prizren",
        agency=ev.AgencyType.csw, office_id="csw.prizren",
    )
    base.update(overrides)
    return base


def one_of_each() -> list[ev.EventData]:
    """A valid payload of every event type in the contract."""
    now = datetime.now(timezone.utc)
    cid = uuid.uuid4()
    acted = dict(actor="csw.prizren.duty", from_status=ev.ReferralStatus.pending,
                 to_status=ev.ReferralStatus.acknowledged)
    notif = dict(notification_id=uuid.uuid4(), referral_id=uuid.uuid4(), case_id=cid,
                 recipient="csw.prizren.duty", channel=ev.Channel.email, cause_event_type="referral.created")
    items: list[ev.EventData] = [
        case_identified(case_id=cid),
        ev.CaseUpdated(case_id=cid, municipality="prizren", school_status=ev.SchoolStatus.enrolled_irregular,
                       updated_by_agency=ev.AgencyType.csw),
        ev.CaseChildWithdrawn(case_id=cid, municipality="prizren", on=date.today(),
                              confirmed_by_agency=ev.AgencyType.csw),
        ev.CaseSchoolEnrolled(case_id=cid, municipality="prizren", on=date.today(),
                              confirmed_by_agency=ev.AgencyType.education),
        ev.CaseClosed(case_id=cid, municipality="prizren", on=date.today(),
                      confirmed_by_agency=ev.AgencyType.csw, reason=ev.CaseClosedReason.resolved),
        ev.ReferralCreated(**_referral_base(case_id=cid), rule_id="csw-every-child", rule_version=1,
                           priority="high", deadline=now + timedelta(hours=24), legal_basis="Law 06/L-084",
                           age_band=ev.AgeBand.from_10_to_14, sector=ev.Sector.street_work,
                           reported_by="police.prizren.duty"),
        ev.ReferralAcknowledged(**_referral_base(), **acted, within_deadline=True),
        ev.ReferralAccepted(**_referral_base(), **{**acted, "from_status": ev.ReferralStatus.acknowledged,
                                                   "to_status": ev.ReferralStatus.accepted}),
        ev.ReferralDeclined(**_referral_base(), **{**acted, "to_status": ev.ReferralStatus.declined},
                            reason=ev.DeclineReason.not_in_mandate),
        ev.ReferralCompleted(**_referral_base(), **{**acted, "from_status": ev.ReferralStatus.accepted,
                                                    "to_status": ev.ReferralStatus.completed},
                             outcome=ev.ReferralOutcome.family_visited),
        ev.ReferralClosed(**_referral_base(), **{**acted, "actor": "csw/prizren", "from_status": ev.ReferralStatus.pending,
                                                 "to_status": ev.ReferralStatus.closed},
                          case_reason=ev.CaseClosedReason.resolved),
        ev.ReferralOverdue(**_referral_base(), deadline=now, status=ev.ReferralStatus.pending),
        ev.ReferralEscalated(**_referral_base(), reason="overdue", escalated_to="coordinator.prizren"),
        ev.NotificationSent(**notif, attempt=1),
        ev.NotificationFailed(**notif, attempts=5, error="SMTPServerDisconnected: connection lost"),
        ev.NotificationAcknowledged(**notif, seconds_to_ack=42.0),
    ]
    assert {type(i).event_type for i in items} == set(ev.EVENT_TYPES), "builders miss an event type"
    return items


def envelope(data: ev.EventData | None = None, **overrides: Any) -> ev.Envelope:
    data = data or case_identified()
    subject = getattr(data, "case_id", None) or uuid.uuid4()
    return ev.Envelope.wrap(data, source=overrides.pop("source", "police/prizren"), subject=subject, **overrides)


def widest_partial(years: int = 10) -> Any:
    """A partition's analytics partial at full breadth: cases of every municipality in every
    month of `years` years, together taking every value of every breakdown and reaching every
    funnel stage (services/analytics/partials.py sizes its records by this)."""
    from services.analytics import rules
    from shared.reference import municipality_slugs

    dims = {"reporter_agency": list(ev.AgencyType), "sector": list(ev.Sector), "sex": list(ev.Sex),
            "age_band": list(ev.AgeBand), "community": list(ev.Community)}
    widest = max(len(v) for v in dims.values())
    agg = rules.Aggregate()
    for muni in municipality_slugs():
        for month in (f"{y}-{m:02d}" for y in range(2026, 2026 + years) for m in range(1, 13)):
            for i in range(widest):
                ident = {d: vals[i % len(vals)].value for d, vals in dims.items()}
                ident |= {"hazardous": "true" if i % 2 else "false", "worst_form": "true" if i % 2 else "false"}
                ref = rules.ReferralState(agency="csw", municipality=muni, status="completed", ack_in_time=True,
                                          accepted=True, completed=True)
                agg.add(rules.CaseState(municipality=muni, month=month, identification=ident, withdrawn=True,
                                        enrolled=True, referrals={"r": ref}))
    return agg
