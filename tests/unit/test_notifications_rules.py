"""Notifications: officer directory data, rules, rendering and webhook signatures (no I/O)."""

from __future__ import annotations

import csv
import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from services.notifications import rules
from services.notifications.directory import (
    SEED_FILE,
    SERB_MAJORITY,
    RosterError,
    parse_roster,
    seed_officers,
)
from services.notifications.render import ALLOWED_FIELDS, LANGUAGES, render
from services.notifications.signing import sign, verify_signature
from shared.reference import agency_offices, municipality_slugs
from tests import builders

HEADER = "officer_id,agency,municipality,office_id,role,language,email,phone,inapp,on_duty\n"


# --- directory -----------------------------------------------------------------------------------


def test_seed_file_is_current_and_covers_every_office_and_municipality():
    rows = list(csv.DictReader(open(SEED_FILE, encoding="utf-8")))
    assert [r["officer_id"] for r in rows] == [o.officer_id for o in seed_officers()], \
        "officers_seed.csv is stale: run python -m services.notifications.directory"
    subs = {r["officer_id"] for r in rows}
    for office in agency_offices().values():
        if office.agency == "coordinator":
            assert f"coordinator.{office.municipality}" in subs
        else:
            assert f"{office.agency}.{office.municipality}.duty" in subs
            assert f"{office.agency}.{office.municipality}.supervisor" in subs
    assert {f"coordinator.{m}" for m in municipality_slugs()} <= subs
    by_sub = {r["officer_id"]: r for r in rows}
    assert by_sub["csw.prizren.duty"]["email"] == "csw.prizren.duty@example.invalid"
    assert by_sub["csw.prizren.duty"]["on_duty"] == "true"
    assert by_sub["csw.prizren.supervisor"]["on_duty"] == "false"
    assert by_sub["csw.zvecan.duty"]["language"] == "sr"
    assert by_sub["csw.prizren.duty"]["language"] == "sq"
    assert SERB_MAJORITY <= municipality_slugs()
    # SMS numbers only for some officers
    with_phone = [r for r in rows if r["phone"]]
    assert 0 < len(with_phone) < len(rows)
    assert parse_roster(SEED_FILE.read_text(encoding="utf-8"))  # the seed passes its own validation


def test_roster_validation_names_row_and_column():
    text = HEADER + (
        "csw.prizren.duty,csw,prizren,csw.prizren,duty_officer,sq,a@example.org,,true,true\n"
        "x.y.z,csw,prizren,csw.prizren,duty_officer,de,a@example.org,,true,true\n"
        "p.prizren.duty,police,prizren,csw.prizren,duty_officer,sq,not-an-email,12345,maybe,true\n"
        "csw.prizren.duty,csw,atlantis,csw.prizren,boss,sq,,,false,false\n"
    )
    with pytest.raises(RosterError) as exc:
        parse_roster(text)
    errors = exc.value.errors
    assert "row 3, column language: 'de' is not one of sq, sr, en" in errors
    assert any(e.startswith("row 4, column office_id:") for e in errors)
    assert any(e.startswith("row 4, column email:") for e in errors)
    assert "not-an-email" not in " ".join(errors)  # contact data is not echoed
    assert any(e.startswith("row 4, column phone:") for e in errors)
    assert any(e.startswith("row 4, column inapp:") for e in errors)
    assert any(e.startswith("row 5, column officer_id:") and "row 2" in e for e in errors)
    assert any(e.startswith("row 5, column municipality:") for e in errors)
    assert any(e.startswith("row 5, column role:") for e in errors)


def test_roster_header_problems_are_reported():
    with pytest.raises(RosterError, match="row 1, column language: required column missing"):
        parse_roster("officer_id,agency,municipality,office_id,role\n")
    with pytest.raises(RosterError, match="row 1, column shoe_size: unknown column"):
        parse_roster(HEADER.strip() + ",shoe_size\n")


def test_roster_parses_defaults_and_booleans():
    officers = parse_roster(HEADER + "a.b.c,csw,prizren,csw.prizren,supervisor,en,,+383 44 123 456,,\n")
    assert officers[0].phone == "+38344123456" and officers[0].inapp is True and officers[0].on_duty is False


# --- rules ---------------------------------------------------------------------------------------


def _c(sub, role="duty_officer", *, on_duty=True, office="csw.prizren", lang="sq", email=True, phone=False):
    return rules.Contact(officer_id=sub, role=role, language=lang, email=email, phone=phone, inapp=True,
                          on_duty=on_duty, office_id=office)


DIRECTORY = [
    _c("csw.prizren.duty", phone=True),
    _c("csw.prizren.duty2", lang="en"),
    _c("csw.prizren.supervisor", "supervisor", on_duty=False),
    _c("csw.peje.duty", office="csw.peje"),
    _c("coordinator.prizren", "coordinator", office="coordinator.prizren"),
    _c("police.prizren.duty", office="police.prizren"),
]


def _who(event_type, reported_by="police.prizren.duty", escalated_to=None):
    out = []
    for a in rules.audiences(event_type, office_id="csw.prizren", municipality="prizren",
                              reported_by=reported_by, escalated_to=escalated_to):
        out += [c.officer_id for c in rules.select(a, DIRECTORY)]
    return sorted(out)


def test_policy_routes_each_event_type_to_the_right_people():
    assert _who("referral.created") == ["csw.prizren.duty", "csw.prizren.duty2"]
    assert _who("referral.overdue") == ["coordinator.prizren", "csw.prizren.supervisor"]
    assert _who("referral.escalated", escalated_to="coordinator.prizren") == ["coordinator.prizren",
                                                                              "csw.prizren.supervisor"]
    assert _who("referral.declined") == ["coordinator.prizren"]
    for t in ("referral.acknowledged", "referral.accepted", "referral.completed"):
        assert _who(t) == ["police.prizren.duty"]
    assert _who("referral.acknowledged", reported_by=None) == []
    assert _who(rules.REALERT) == ["csw.prizren.supervisor"]
    # the case closed and the office's referral with it: the office is told (issue 16)
    assert _who("referral.closed") == ["csw.prizren.duty", "csw.prizren.duty2", "csw.prizren.supervisor"]
    assert _who("referral.unknown") == []


def test_nobody_on_duty_falls_back_to_the_supervisor():
    directory = [_c("csw.prizren.duty", on_duty=False), _c("csw.prizren.supervisor", "supervisor", on_duty=False)]
    got = rules.select(rules.Audience("office_on_duty", "csw.prizren"), directory)
    assert [c.officer_id for c in got] == ["csw.prizren.supervisor"]


def test_recipients_of_an_event_include_someone_missing_from_the_directory():
    audiences = rules.audiences("referral.accepted", office_id="csw.prizren", municipality="zvecan",
                                reported_by="ngo.zvecan.someone")
    (stranger,) = rules.recipients(audiences, DIRECTORY, fallback_language="sr")
    assert (stranger.officer_id, stranger.language, stranger.inapp, stranger.email) == (
        "ngo.zvecan.someone", "sr", True, False)
    overdue = rules.audiences("referral.overdue", office_id="csw.prizren", municipality="prizren", reported_by=None)
    assert [c.officer_id for c in rules.recipients(overdue, DIRECTORY, fallback_language="sq")] == [
        "csw.prizren.supervisor", "coordinator.prizren"]


def test_channels_and_deterministic_ids():
    eid = uuid.uuid4()
    planned = rules.plan(eid, "referral.created", [DIRECTORY[0], DIRECTORY[0]], priority="urgent")
    assert [(p.recipient, p.channel) for p in planned] == [
        ("csw.prizren.duty", "inapp"), ("csw.prizren.duty", "email"), ("csw.prizren.duty", "sms")]
    assert planned == rules.plan(eid, "referral.created", [DIRECTORY[0]], priority="urgent")  # same ids again
    assert len({p.notification_id for p in planned}) == 3
    assert planned[1].notification_id == rules.notification_id(eid, "csw.prizren.duty", "email")
    assert planned[1].notification_id != rules.notification_id(uuid.uuid4(), "csw.prizren.duty", "email")
    # no SMS for a normal-priority referral or a status change
    assert "sms" not in [p.channel for p in rules.plan(eid, "referral.created", [DIRECTORY[0]], priority="normal")]
    assert "sms" not in [p.channel for p in rules.plan(eid, "referral.accepted", [DIRECTORY[0]])]
    assert "sms" in [p.channel for p in rules.plan(eid, "referral.overdue", [DIRECTORY[0]])]
    # someone not in the directory still gets the in-app alert
    stranger = rules.unknown_officer("ngo.prizren.someone", "sq")
    assert [p.channel for p in rules.plan(eid, "referral.accepted", [stranger])] == ["inapp"]


def test_backoff_grows_exponentially_and_is_capped():
    lo = [rules.backoff_s(a, base_s=1, max_s=30, jitter=0.0) for a in range(1, 8)]
    hi = [rules.backoff_s(a, base_s=1, max_s=30, jitter=0.999) for a in range(1, 8)]
    assert lo[:5] == [0.5, 1, 2, 4, 8] and lo[-1] == 15
    assert all(h <= 30 for h in hi) and hi[2] > lo[2]


# --- rendering -----------------------------------------------------------------------------------

PII = {
    "child_name": "Arben Krasniqi", "name": "Arben", "first_name": "Arben", "last_name": "Krasniqi",
    "date_of_birth": "2012-03-04", "birth_date": "2012-03-04", "address": "Rruga e Shkronjave 7",
    "phone": "+38344999888", "email": "parent@example.org", "notes": "lives behind the bakery",
    "child_ref": "cr_0123456789abcdef0123", "community": "roma", "sex": "female",
}


def _facts(**extra):
    created = builders.one_of_each()[5]
    data = created.model_dump(mode="json")
    data.update(reason="overdue", outcome="family_visited", status="pending", within_deadline=False, **extra)
    return data


EVENT_TEMPLATES = sorted(rules.TEMPLATED)


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("event_type", EVENT_TEMPLATES)
def test_every_template_renders_in_every_language(event_type, language):
    facts = _facts()
    msg = render(event_type, language, facts, base_url="https://clms.example.org")
    assert msg.subject and "\n" not in msg.subject and len(msg.subject) < 200
    assert str(facts["case_id"]) in msg.body
    assert msg.link == f"https://clms.example.org/referrals/{facts['referral_id']}"  # the workspace page
    assert msg.link in msg.body
    assert "Prizren" in msg.subject + msg.body
    assert "{{" not in msg.body and "@@" not in msg.body


def test_language_and_contents_of_a_new_referral_alert():
    deadline = datetime(2026, 1, 31, 9, 0, tzinfo=timezone.utc)
    facts = _facts(deadline=deadline.isoformat(), priority="urgent", sector="begging", age_band="10_14")
    sq = render("referral.created", "sq", facts, base_url="http://x")
    sr = render("referral.created", "sr", facts, base_url="http://x")
    en = render("referral.created", "en", facts, base_url="http://x")
    assert "Referim i ri" in sq.subject and "URGJENT" in sq.subject and "Qendra për Punë Sociale" in sq.subject
    assert "Novi uput" in sr.subject and "HITNO" in sr.subject and "Centar za socijalni rad" in sr.subject
    assert "New referral" in en.subject and "URGENT" in en.subject
    assert "2026-01-31 10:00 CET" in en.body  # deadline in Kosovo's local time
    assert "lypje" in sq.body and "prosjačenje" in sr.body and "begging" in en.body
    assert "10–14" in en.body


def test_templates_never_print_personal_data():
    assert not ALLOWED_FIELDS & set(PII)
    facts = _facts(**PII)
    for event_type in EVENT_TEMPLATES:
        for language in LANGUAGES:
            msg = render(event_type, language, facts, base_url="http://x")
            text = msg.subject + "\n" + msg.body
            for key, value in PII.items():
                if key in ("community", "sex"):
                    assert not re.search(rf"\b{value}\b", text, re.IGNORECASE), (event_type, language, key)
                else:
                    assert value not in text, (event_type, language, key)


# --- signatures ----------------------------------------------------------------------------------


def test_webhook_signature_verifies_and_tampering_fails():
    body = b'{"to":"+38300000001","text":"hello"}'
    headers = sign(body, "s3cret", timestamp=1_700_000_000)
    assert verify_signature(body, headers, "s3cret", now=1_700_000_010)
    assert verify_signature(body, {k.lower(): v for k, v in headers.items()}, "s3cret", now=1_700_000_010)
    assert not verify_signature(body.replace(b"hello", b"hellO"), headers, "s3cret", now=1_700_000_010)
    assert not verify_signature(body, headers, "other-secret", now=1_700_000_010)
    assert not verify_signature(body, headers, "s3cret", now=1_700_000_000 + 3600)  # replayed later
    forged = {**headers, "X-CLMS-Timestamp": "1700000005"}
    assert not verify_signature(body, forged, "s3cret", now=1_700_000_010)
    assert not verify_signature(body, {}, "s3cret")
    assert not verify_signature(body, {**headers, "X-CLMS-Webhook-Id": "another-id-1234"}, "s3cret", now=1_700_000_010)
    assert headers["X-CLMS-Signature"].startswith("sha256=")


def test_future_deadline_fixture_is_sane():
    assert datetime.fromisoformat(_facts()["deadline"]) > datetime.now(timezone.utc) - timedelta(minutes=1)


def test_every_label_is_a_whole_sentence_in_each_language():
    """A comma inside an unquoted YAML flow mapping splits a label ("extractive work (mines")."""
    from pathlib import Path

    import yaml

    import services.notifications

    labels = yaml.safe_load((Path(services.notifications.__file__).parent / "templates/labels.yaml").read_text())
    for group, entries in labels.items():
        if not isinstance(entries, dict):
            continue
        for key, texts in entries.items():
            if isinstance(texts, dict):
                assert set(texts) <= {"sq", "sr", "en"} and all(isinstance(t, str) for t in texts.values()), \
                    f"{group}.{key}: {texts}"


def test_a_loop_sleeps_until_the_earliest_due_time_capped_and_never_spins():
    """The delivery and re-alert loops sleep until what they wait for falls due (a hair after,
    for the database's clock), no longer than the safety net, and pause briefly (never zero)
    when something is due already but was not taken."""
    assert rules.sleep_until_due(None, cap_s=60) == 60  # nothing pending: only the safety net
    assert rules.sleep_until_due(2.0, cap_s=60) == pytest.approx(2.0 + rules.DUE_MARGIN_S)
    assert rules.sleep_until_due(600.0, cap_s=60) == 60
    assert rules.sleep_until_due(-3.0, cap_s=60) == rules.BUSY_PAUSE_S > 0
    assert rules.sleep_until_due(0.0, cap_s=60) == rules.BUSY_PAUSE_S


async def test_an_alarm_rings_only_for_what_falls_due_before_its_sleep_ends():
    import asyncio

    from shared.wakeup import Alarm

    alarm = Alarm()
    alarm.ring_if_due_before(3600)  # awake: always rung, it looks again after its round
    await asyncio.wait_for(alarm.wait(60), 1)
    sleeper = asyncio.create_task(alarm.wait(60))
    await asyncio.sleep(0)  # let it fall asleep
    assert 59 < alarm.asleep_s <= 60
    alarm.ring_if_due_before(120)  # falls due after it wakes anyway: not rung
    assert alarm.asleep_s > 59 and not sleeper.done()
    alarm.ring_if_due_before(5)
    await asyncio.wait_for(sleeper, 1)
    assert alarm.asleep_s == 0


def test_an_email_reads_back_as_written_in_albanian_and_serbian():
    """The e-mail an officer's client shows: the subject and body exactly as rendered (non-ASCII
    letters included), the language tagged, addressed to the officer and nobody else."""
    from email import message_from_bytes, policy

    from services.notifications.channels import OutgoingMessage, render_email

    for subject, body, lang in (("Referim i ri: afati për rastin – 24 orë", "Hapni rastin në CLMS.\nFaleminderit.\n", "sq"),
                                ("Нова упута: рок 24 сата", "Отворите предмет у CLMS-у.\n", "sr")):
        out = OutgoingMessage(notification_id="n-1", recipient="csw.prizren.duty", channel="email",
                              address="duty@csw-prizren.example", language=lang, subject=subject, body=body, link=None)
        raw = render_email(out, sender="CLMS <clms@example.org>").as_bytes()
        assert raw.isascii()  # 7-bit safe on any relay
        mail = message_from_bytes(raw, policy=policy.default)
        assert mail["Subject"] == subject
        assert mail.get_body().get_content() == body
        assert mail["To"] == "duty@csw-prizren.example" and mail["Cc"] is None and mail["Bcc"] is None
        assert mail["Content-Language"] == lang
        assert mail["X-CLMS-Notification-Id"] == "n-1"


def test_an_email_header_with_a_line_break_is_refused():
    """A line break in a header value would let it add headers (a Bcc to an outsider)."""
    import pytest

    from services.notifications.channels import OutgoingMessage, render_email

    for field, value in (("subject", "Referral\r\nBcc: outsider@example.org"),
                         ("address", "duty@csw-prizren.example\nBcc: outsider@example.org")):
        fields = dict(notification_id="n-1", recipient="csw.prizren.duty", channel="email",
                      address="duty@csw-prizren.example", language="en", subject="Referral", body="Open it.\n",
                      link=None)
        fields[field] = value
        with pytest.raises(ValueError, match="line break"):
            render_email(OutgoingMessage(**fields), sender="CLMS <clms@example.org>")
