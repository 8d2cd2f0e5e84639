"""Pure parts of issue 15 items 5 and 6: contact redaction, the master keyring, per-case child
tokens, and the coarsened case.identified."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import date

import pytest

from services.analytics.rules import CaseState, apply_event
from services.intake.crypto import (
    CaseCipher,
    DecryptionError,
    child_token,
    derived_kid,
    parse_master_keys,
)
from shared import events as ev
from shared.kafka import DLQ_HEADER_ERROR, DeadLetter
from shared.redact import redact_contacts
from tests import builders


@pytest.mark.parametrize("text, expected", [
    ("550 5.1.1 <anna.krasniqi@csw.rks-gov.net>: Recipient address rejected",
     "550 5.1.1 <<e-mail>>: Recipient address rejected"),
    ("SMTPRecipientRefused(550, 'x', 'police.prizren.duty@example.invalid')",
     "SMTPRecipientRefused(550, 'x', '<e-mail>')"),
    ("gateway refused +383 44 987 654", "gateway refused <phone>"),
    ("gateway refused +38344987654", "gateway refused <phone>"),
    ("call 044-987-654 or 00383 49 555 017.", "call <phone> or <phone>."),
    # what error texts need stays
    ("on 2026-11-29 at 10:00", "on 2026-11-29 at 10:00"),
    ("ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 2525)",
     "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 2525)"),
    ("referral 12345678-1234-1234-1234-123456789012 attempt 4 of 4",
     "referral 12345678-1234-1234-1234-123456789012 attempt 4 of 4"),
    ("(535, b'5.7.8 Authentication failed') timeout 30.0s", "(535, b'5.7.8 Authentication failed') timeout 30.0s"),
    ("", ""),
])
def test_contacts_are_redacted_from_error_texts(text, expected):
    assert redact_contacts(text) == expected


def test_a_dead_letter_never_carries_an_address_in_its_error_header():
    letter = DeadLetter(topic="t", partition=0, offset=1, key=None, value=None, reason="handler_error",
                        error="SMTPRecipientsRefused: anna@example.org refused; sms +383 44 987 654 refused")
    header = dict(letter.headers())[DLQ_HEADER_ERROR].decode()
    assert header == "SMTPRecipientsRefused: <e-mail> refused; sms <phone> refused"


def key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def test_master_keys_parse_as_kid_key_pairs_newest_last_with_sentences_for_mistakes():
    k1, k2 = key(), key()
    ring = parse_master_keys(f"2026-01:{k1}, 2026-11:{k2}")
    assert [kid for kid, _ in ring] == ["2026-01", "2026-11"]
    for bad, words in [("", "is empty"), (k1, "must be 'kid:key'"), (f"a b:{k1}", "must be 'kid:key'"),
                       (f"x:{k1},x:{k2}", "appears twice"), ("x:c2hvcnQ=", r"entry 1 \(x\): ENCRYPTION_MASTER_KEY must decode to 32 bytes")]:
        with pytest.raises(ValueError, match=words):
            parse_master_keys(bad)


def test_new_data_keys_go_under_the_newest_kid_old_ones_still_open_and_rewrap_keeps_the_token():
    k1, k2 = os.urandom(32), os.urandom(32)
    case_id = uuid.uuid4()
    old = CaseCipher([("k1", k1)])
    sealed = old.seal(case_id, b'{"given_name": "Arber"}')
    assert sealed.master_key_id == "k1"
    both = CaseCipher([("k1", k1), ("k2", k2)])
    assert both.master_key_id == "k2" and both.seal(case_id, b"{}").master_key_id == "k2"
    assert both.open(case_id, ciphertext=sealed.ciphertext, wrapped_key=sealed.wrapped_key, kid="k1") == \
        b'{"given_name": "Arber"}'
    wrapped, kid = both.rewrap(case_id, sealed.wrapped_key, "k1")
    assert kid == "k2" and wrapped != sealed.wrapped_key
    new_only = CaseCipher([("k2", k2)])
    assert new_only.open(case_id, ciphertext=sealed.ciphertext, wrapped_key=wrapped, kid="k2") == \
        b'{"given_name": "Arber"}'
    assert new_only.token(case_id, wrapped, "k2") == sealed.token  # the token follows the data key
    with pytest.raises(DecryptionError, match="'k1', which is not in ENCRYPTION_MASTER_KEYS"):
        new_only.unwrap(case_id, sealed.wrapped_key, "k1")
    with pytest.raises(DecryptionError):
        new_only.unwrap(case_id, sealed.wrapped_key)
    # a single ENCRYPTION_MASTER_KEY keeps the kid rows written before key ids existed carry
    assert CaseCipher(k1).master_key_id == derived_kid(k1)


def test_child_tokens_are_per_case_and_need_the_data_key():
    data_key = os.urandom(32)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert child_token(data_key, a) != child_token(data_key, b)
    assert child_token(data_key, a) != child_token(os.urandom(32), a)
    assert child_token(data_key, a).startswith("ct_") and len(child_token(data_key, a)) == 43
    cipher = CaseCipher(os.urandom(32))
    one, two = cipher.seal(a, b"{}"), cipher.seal(a, b"{}")  # the same child reported twice
    assert one.token != two.token


def test_case_identified_carries_the_month_and_still_reads_older_records_with_the_date():
    new = builders.case_identified(identified_on=None, identified_month="2026-03", activity=None)
    assert new.month == "2026-03"
    old = builders.case_identified(identified_on=date(2026, 2, 14))
    assert old.month == "2026-02"
    with pytest.raises(ValueError, match="identified_month: field required"):
        builders.case_identified(identified_on=None)
    with pytest.raises(ValueError):
        builders.case_identified(identified_on=None, identified_month="2026-13")
    state, applied = apply_event(CaseState(), builders.envelope(new))
    assert applied and state.month == "2026-03"


def test_every_case_identified_field_has_its_reason_next_to_the_model():
    doc = ev.CaseIdentified.__doc__ or ""
    for name in ev.CaseIdentified.model_fields:
        assert name in doc, f"CaseIdentified.{name} has no line in the model's field table"


def test_case_outcomes_need_no_day_and_still_read_older_records_with_it():
    """case.child_withdrawn / school_enrolled / closed are published without `on` (no consumer
    reads the day); records written before still parse, and analytics counts either form."""
    cid = uuid.uuid4()
    for model, extra in ((ev.CaseChildWithdrawn, {}), (ev.CaseSchoolEnrolled, {}),
                         (ev.CaseClosed, {"reason": "resolved"})):
        new = model(case_id=cid, municipality="prizren", confirmed_by_agency=ev.AgencyType.csw, **extra)
        assert new.on is None
        old = ev.parse_envelope({**builders.envelope(new).to_dict(),
                                 "data": {**new.model_dump(mode="json"), "on": "2026-02-14"}})
        assert old.data.on == date(2026, 2, 14)
    state, _ = apply_event(CaseState(), builders.envelope(
        ev.CaseChildWithdrawn(case_id=cid, municipality="prizren", confirmed_by_agency=ev.AgencyType.csw)))
    assert state.withdrawn


def test_every_case_outcome_field_has_its_reason_next_to_the_model():
    doc = ev.CaseClosed.__mro__[1].__doc__ or ""  # _CaseOutcome, the table of its fields
    rows = [line.strip().split("|")[1] for line in doc.splitlines() if line.strip().startswith("| ")]
    listed = {name.strip().split(" ")[0] for row in rows for name in row.split(",")}
    for model in (ev.CaseChildWithdrawn, ev.CaseSchoolEnrolled, ev.CaseClosed):
        for name in model.model_fields:
            assert name in listed, f"{model.__name__}.{name} has no line in _CaseOutcome's field table"


def test_production_refuses_the_development_master_key_inside_encryption_master_keys():
    from shared.settings import Settings
    from tests.unit.test_deploy_settings import REAL

    dev = "ZGV2LW9ubHktY2hhbmdlLW1lLW1hc3Rlci1rZXktMzI="
    with pytest.raises(ValueError, match="ENCRYPTION_MASTER_KEYS still holds the development master key"):
        Settings(_env_file=None, CLMS_ENV="production", **REAL, ENCRYPTION_MASTER_KEYS=f"old:{dev},new:{key()}")
    ok = Settings(_env_file=None, CLMS_ENV="production", **REAL, ENCRYPTION_MASTER_KEYS=f"old:{key()},new:{key()}")
    assert CaseCipher.from_settings(ok).kids == ("old", "new")
    assert CaseCipher.from_settings(Settings(_env_file=None, ENCRYPTION_MASTER_KEYS=" ")).kids == (
        derived_kid(base64.urlsafe_b64decode(dev)),)
