"""The analytics counting rules without I/O: which counters an event moves, idempotence,
out-of-order tolerance and the quantile sketch (disclosure control: test_analytics_disclosure.py)."""

from __future__ import annotations

import random
import uuid
from datetime import date, datetime, timedelta, timezone

from services.analytics import rules as c
from shared import events as ev
from tests import builders


def _wrap(data, *, time=None):
    subject = getattr(data, "case_id", None) or uuid.uuid4()
    return ev.Envelope.wrap(data, source="test", subject=subject, time=time)


def _ref(case_id, rid, agency=ev.AgencyType.csw, muni="prizren"):
    return dict(referral_id=rid, case_id=case_id, municipality=muni, agency=agency,
                office_id=f"{agency.value}.{muni}")


def _created(case_id, rid, **kw):
    return ev.ReferralCreated(**_ref(case_id, rid, **kw), rule_id="csw-every-child", rule_version=1,
                              priority="high", deadline=datetime.now(timezone.utc) + timedelta(hours=24),
                              legal_basis="x", age_band=ev.AgeBand.from_10_to_14,
                              sector=ev.Sector.street_work, reported_by="police.prizren.duty")


def _acted(cls, case_id, rid, frm, to, **extra):
    return cls(**_ref(case_id, rid), actor="csw.prizren.duty", from_status=frm, to_status=to, **extra)


def fold(events):
    s = c.CaseState()
    for e in events:
        s, _ = c.apply_event(s, e)
    return s


def test_identification_moves_total_and_every_breakdown_for_its_municipality_and_month():
    ident = builders.case_identified(municipality="gjilan", identified_on=date(2026, 3, 9),
                                     reporter_agency=ev.AgencyType.labour_inspectorate,
                                     sector=ev.Sector.agriculture, sex=ev.Sex.female,
                                     age_band=ev.AgeBand.under_10, community=ev.Community.ashkali,
                                     hazardous=False, worst_form=False)
    new, applied = c.apply_event(c.CaseState(), _wrap(ident))
    assert applied
    d = c.counter_deltas(c.CaseState(), new)
    assert d == {
        ("id", "gjilan", "2026-03", "total", ""): 1,
        ("id", "gjilan", "2026-03", "reporter_agency", "labour_inspectorate"): 1,
        ("id", "gjilan", "2026-03", "sector", "agriculture"): 1,
        ("id", "gjilan", "2026-03", "sex", "female"): 1,
        ("id", "gjilan", "2026-03", "age_band", "under_10"): 1,
        ("id", "gjilan", "2026-03", "community", "ashkali"): 1,
        ("id", "gjilan", "2026-03", "hazardous", "false"): 1,
        ("id", "gjilan", "2026-03", "worst_form", "false"): 1,
        ("fn", "gjilan", "2026-03", "identified"): 1,
    }


def test_redelivered_event_changes_nothing():
    e = _wrap(builders.case_identified())
    s1, applied1 = c.apply_event(c.CaseState(), e)
    s2, applied2 = c.apply_event(s1, e)
    assert applied1 and not applied2
    assert c.counter_deltas(s1, s2) == {}
    # also after a round trip through the table's bytes
    s3, applied3 = c.apply_event(c.CaseState.from_bytes(s1.to_bytes()), e)
    assert not applied3


def test_funnel_counts_each_case_once_per_stage_and_referrals_open_and_close():
    ident = builders.case_identified(municipality="prizren", identified_on=date(2026, 1, 5))
    cid = ident.case_id
    r1, r2 = uuid.uuid4(), uuid.uuid4()
    P, A, AC = ev.ReferralStatus.pending, ev.ReferralStatus.acknowledged, ev.ReferralStatus.accepted
    t0 = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    events = [
        _wrap(ident, time=t0),
        _wrap(_created(cid, r1), time=t0),
        _wrap(_created(cid, r2, agency=ev.AgencyType.education), time=t0),
    ]
    s = fold(events)
    counts = c.contributions(s)
    assert counts[("fn", "prizren", "2026-01", "referred")] == 1  # two referrals, one case
    assert counts[("ref", "prizren", "csw", "open")] == 1
    assert counts[("ref", "prizren", "education", "open")] == 1

    s2 = fold(events + [
        _wrap(ev.ReferralOverdue(**_ref(cid, r2, agency=ev.AgencyType.education), deadline=t0, status=P)),
        _wrap(_acted(ev.ReferralAcknowledged, cid, r1, P, A, within_deadline=True),
              time=t0 + timedelta(minutes=30)),
        _wrap(_acted(ev.ReferralAccepted, cid, r1, A, AC)),
        _wrap(_acted(ev.ReferralCompleted, cid, r1, AC, ev.ReferralStatus.completed,
                     outcome=ev.ReferralOutcome.family_visited)),
        _wrap(ev.CaseChildWithdrawn(case_id=cid, municipality="prizren", on=date(2026, 2, 1),
                                    confirmed_by_agency=ev.AgencyType.csw)),
        _wrap(ev.CaseSchoolEnrolled(case_id=cid, municipality="prizren", on=date(2026, 2, 2),
                                    confirmed_by_agency=ev.AgencyType.education)),
    ])
    counts = c.contributions(s2)
    for stage in c.FUNNEL_STAGES:
        assert counts[("fn", "prizren", "2026-01", stage)] == 1, stage
    assert ("ref", "prizren", "csw", "open") not in counts  # completed
    assert counts[("ref", "prizren", "education", "open")] == 1
    assert counts[("ref", "prizren", "education", "overdue")] == 1
    assert c.ack_samples(s2) == [("prizren", "csw", 1800.0)]

    # the case closes: the still-open education referral is closed with it
    s3 = fold([*events, _wrap(ev.CaseClosed(case_id=cid, municipality="prizren", on=date(2026, 3, 1),
                                            confirmed_by_agency=ev.AgencyType.csw,
                                            reason=ev.CaseClosedReason.resolved))])
    assert not [k for k in c.contributions(s3) if k[0] == "ref"]


def test_time_to_acknowledge_is_the_same_whichever_of_creation_and_acknowledgement_comes_first():
    """After a rebalance a partition can be read again from an earlier offset while a later
    record was already folded: the acknowledgement then precedes its referral's creation."""
    cid, rid = uuid.uuid4(), uuid.uuid4()
    P, A = ev.ReferralStatus.pending, ev.ReferralStatus.acknowledged
    t0 = datetime(2026, 1, 10, 8, 0, tzinfo=timezone.utc)
    created = _wrap(_created(cid, rid), time=t0)
    acked = _wrap(_acted(ev.ReferralAcknowledged, cid, rid, P, A, within_deadline=True),
                  time=t0 + timedelta(minutes=45))
    in_order, reversed_ = fold([created, acked]), fold([acked, created])
    assert c.ack_samples(in_order) == c.ack_samples(reversed_) == [("prizren", "csw", 2700.0)]
    assert c.contributions(in_order) == c.contributions(reversed_)
    # a second acknowledgement (redelivered under a new id) does not move the first one
    later = _wrap(_acted(ev.ReferralAcknowledged, cid, rid, P, A, within_deadline=True),
                  time=t0 + timedelta(hours=5))
    assert c.ack_samples(fold([acked, created, later])) == [("prizren", "csw", 2700.0)]
    # a state written before acknowledgement times were kept (no "ka" field) still loads
    raw = in_order.to_bytes().replace(b'"ka":', b'"old":')
    assert c.ack_samples(c.CaseState.from_bytes(raw)) == [("prizren", "csw", 2700.0)]


def test_declined_referral_leaves_open_and_late_acknowledgement_is_not_in_time():
    cid, rid = uuid.uuid4(), uuid.uuid4()
    P, A = ev.ReferralStatus.pending, ev.ReferralStatus.acknowledged
    s = fold([_wrap(_created(cid, rid)),
              _wrap(_acted(ev.ReferralAcknowledged, cid, rid, P, A, within_deadline=False)),
              _wrap(_acted(ev.ReferralDeclined, cid, rid, A, ev.ReferralStatus.declined,
                           reason=ev.DeclineReason.not_in_mandate))])
    counts = c.contributions(s)
    assert not [k for k in counts if k[0] == "ref"]
    assert not [k for k in counts if k[0] == "fn" and k[3] == "acknowledged_in_time"]


def test_referral_before_identification_is_recounted_under_the_identification_month():
    ident = builders.case_identified(municipality="peje", identified_on=date(2025, 12, 30))
    created = _wrap(_created(ident.case_id, uuid.uuid4(), muni="peje"),
                    time=datetime(2026, 1, 2, tzinfo=timezone.utc))
    s1, _ = c.apply_event(c.CaseState(), created)
    assert c.contributions(s1)[("fn", "peje", "2026-01", "referred")] == 1
    s2, _ = c.apply_event(s1, _wrap(ident))
    d = c.counter_deltas(s1, s2)
    assert d[("fn", "peje", "2026-01", "referred")] == -1
    assert d[("fn", "peje", "2025-12", "referred")] == 1
    assert d[("fn", "peje", "2025-12", "identified")] == 1


def test_case_update_moves_the_sector_count():
    ident = builders.case_identified(identified_on=date(2026, 4, 1), sector=ev.Sector.street_work)
    s1 = fold([_wrap(ident)])
    s2, _ = c.apply_event(s1, _wrap(ev.CaseUpdated(case_id=ident.case_id, municipality="prizren",
                                                   sector=ev.Sector.begging,
                                                   updated_by_agency=ev.AgencyType.csw)))
    d = c.counter_deltas(s1, s2)
    assert d == {("id", "prizren", "2026-04", "sector", "street_work"): -1,
                 ("id", "prizren", "2026-04", "sector", "begging"): 1}


def test_aggregate_live_updates_equal_a_rebuild_in_any_redelivery_pattern():
    rng = random.Random(7)
    cases = []
    for i in range(30):
        ident = builders.case_identified(municipality=rng.choice(["prizren", "gjilan", "decan"]),
                                         identified_on=date(2026, rng.randint(1, 3), 1))
        rid = uuid.uuid4()
        t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        evs = [_wrap(ident, time=t0), _wrap(_created(ident.case_id, rid, muni=ident.municipality), time=t0)]
        if i % 2:
            evs.append(_wrap(ev.ReferralAcknowledged(
                **_ref(ident.case_id, rid, muni=ident.municipality), actor="x",
                from_status=ev.ReferralStatus.pending, to_status=ev.ReferralStatus.acknowledged,
                within_deadline=True), time=t0 + timedelta(seconds=60 * (i + 1))))
        cases.append(evs)
    agg, states = c.Aggregate(), {}
    for evs in cases:
        for e in evs:
            for _ in range(rng.randint(1, 3)):  # at-least-once: some events arrive 2-3 times
                key = e.subject
                old = states.get(key, c.CaseState())
                new, applied = c.apply_event(old, e)
                if applied:
                    states[key] = new
                    agg.replace(old, new)
    rebuilt = c.Aggregate()
    rebuilt.rebuild(states.values())
    assert agg.counts == rebuilt.counts
    total = sum(n for k, n in agg.counts.items() if k[0] == "id" and k[3] == "total")
    assert total == 30
    sk = c.LogHistogram()
    for (m, a), h in rebuilt.ack.items():
        sk.merge(h)
    assert sk.count == 15


def test_log_histogram_quantiles_are_within_the_relative_error_and_merge():
    rng = random.Random(1)
    values = [rng.lognormvariate(6, 1.5) for _ in range(5000)]
    a, b = c.LogHistogram(), c.LogHistogram()
    for i, v in enumerate(values):
        (a if i % 2 else b).add(v)
    merged = c.LogHistogram().merge(a).merge(b)
    assert merged.count == 5000
    values.sort()
    for q in (0.5, 0.9):
        exact = values[int(q * (len(values) - 1))]
        assert abs(merged.quantile(q) - exact) / exact < 0.03, q
    h = c.LogHistogram()
    h.add(100.0)
    h.add(200.0)
    h.remove(200.0)
    assert h.count == 1 and abs(h.quantile(0.9) - 100) < 2
    assert c.LogHistogram().quantile(0.5) is None


def test_counting_module_has_no_io_imports():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(c))
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    assert not names & {"faust", "fastapi", "aiokafka", "asyncpg", "httpx", "starlette"}


def test_partial_aggregates_round_trip_and_sum_to_the_whole():
    """Workers publish one aggregate per partition; the sum of the decoded partials is the
    aggregate one worker holding every case would have (counts and acknowledgement sketches)."""
    rng = random.Random(7)
    t0 = datetime.now(timezone.utc)

    def _referred(ident, acknowledge_after_s):
        rid = uuid.uuid4()
        ack = _acted(ev.ReferralAcknowledged, ident.case_id, rid, ev.ReferralStatus.pending,
                     ev.ReferralStatus.acknowledged, within_deadline=True)
        return [_wrap(ident), _wrap(_created(ident.case_id, rid), time=t0),
                _wrap(ack, time=t0 + timedelta(seconds=acknowledge_after_s))]

    whole = c.Aggregate()
    parts = [c.Aggregate() for _ in range(3)]
    for i in range(60):
        state = c.CaseState()
        ident = builders.case_identified(municipality=rng.choice(["prizren", "gjilan", "peje"]))
        for e in _referred(ident, acknowledge_after_s=rng.randint(30, 9000)):
            state, _ = c.apply_event(state, e)
        whole.replace(c.CaseState(), state)
        parts[i % 3].replace(c.CaseState(), state)
    combined = c.Aggregate()
    combined.load_sum(c.Aggregate.from_bytes(p.to_bytes()) for p in parts)
    assert combined.counts == whole.counts and combined.version == 1
    assert combined.ack.keys() == whole.ack.keys()
    for k, sk in whole.ack.items():
        assert combined.ack[k].buckets == sk.buckets and combined.ack[k].count == sk.count


def test_a_decade_of_every_breakdown_in_every_municipality_fits_one_compressed_partial():
    """A partition's partial at full breadth for ten years (`builders.widest_partial`). Its JSON
    is over the broker's default record limit, so the worker sends it gzip-compressed
    (services/analytics/partials.py); compressed it must fit, and decode to the same counts."""
    from aiokafka.codec import gzip_decode, gzip_encode

    from services.analytics.partials import BROKER_RECORD_LIMIT, COMPRESSION

    assert COMPRESSION == "gzip"
    agg = builders.widest_partial(years=10)
    raw = agg.to_bytes()
    assert len(raw) > BROKER_RECORD_LIMIT  # uncompressed it would not fit
    packed = gzip_encode(raw)
    assert len(packed) < 0.9 * BROKER_RECORD_LIMIT, len(packed)
    assert c.Aggregate.from_bytes(gzip_decode(packed)).counts == agg.counts
