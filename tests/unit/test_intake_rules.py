"""Intake's pure rules: child_ref normalisation, ages, worst forms, activities, envelope encryption,
request validation messages."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import date, timedelta

import pytest
from pydantic import ValidationError

from shared.events import AgeBand, AgencyType, Sector, describe_validation_error
from shared.settings import Settings
from services.intake import rules
from services.intake.crypto import CaseCipher, DecryptionError, parse_master_key
from services.intake.models import InboundEnvelope, IdentificationRequest, UpdatedIn

KEY = b"k" * 32


def ref(given: str, family: str, year: int, key: bytes = KEY) -> str:
    return rules.child_ref(key, given_name=given, family_name=family, year_of_birth=year)


@pytest.mark.parametrize("given,family", [
    ("Arbër", "Krasniqi"),
    ("  ARBER ", "krasniqi"),
    ("arbër", "Kras-niqi"),
    ("Arber", "KRASNIQÍ"),
])
def test_spacing_case_hyphens_and_diacritics_do_not_change_the_child_ref(given, family):
    assert ref(given, family, 2014) == ref("Arber", "Krasniqi", 2014)


def test_letters_without_decomposition_are_mapped():
    assert rules.normalise_name("Đorđević") == "djordjevic"
    assert ref("Miloš", "Đorđević", 2012) == ref("Milos", "Djordjevic", 2012)


def test_child_ref_differs_by_name_year_and_key_and_reveals_nothing():
    base = ref("Arber", "Krasniqi", 2014)
    assert base != ref("Arben", "Krasniqi", 2014)
    assert base != ref("Arber", "Krasniqi", 2015)
    assert base != ref("Arber", "Krasniqi", 2014, key=b"x" * 32)
    assert base.startswith("cr_") and len(base) == 3 + 64
    assert "arber" not in base.lower()


def test_birth_year_from_date_of_birth_or_estimate():
    on = date(2026, 5, 1)
    assert rules.birth_year(date_of_birth=date(2014, 12, 31), estimated_age=None, identified_on=on) == 2014
    assert rules.birth_year(date_of_birth=None, estimated_age=12, identified_on=on) == 2014
    with pytest.raises(ValueError):
        rules.birth_year(date_of_birth=None, estimated_age=None, identified_on=on)


@pytest.mark.parametrize("age,band,school", [
    (0, AgeBand.under_10, False), (5, AgeBand.under_10, False), (6, AgeBand.under_10, True),
    (9, AgeBand.under_10, True), (10, AgeBand.from_10_to_14, True), (14, AgeBand.from_10_to_14, True),
    (15, AgeBand.from_15_to_17, True), (16, AgeBand.from_15_to_17, False), (17, AgeBand.from_15_to_17, False),
])
def test_age_band_and_compulsory_school_age(age, band, school):
    assert rules.age_band(age) is band
    assert rules.is_compulsory_school_age(age) is school


def test_age_on_counts_completed_years():
    assert rules.age_on(date(2014, 6, 10), date(2026, 6, 9)) == 11
    assert rules.age_on(date(2014, 6, 10), date(2026, 6, 10)) == 12


def test_worst_forms():
    assert rules.is_worst_form(Sector.trafficking, "trafficking_for_labour")
    assert rules.is_worst_form(Sector.begging, "forced_begging")
    assert not rules.is_worst_form(Sector.begging, "begging")
    assert not rules.is_worst_form(Sector.agriculture, "harvesting")


def test_every_sector_has_activities_and_unknown_ones_name_the_allowed_codes():
    assert set(rules.activities()) == set(Sector)
    with pytest.raises(ValueError, match="allowed: street_vending"):
        rules.check_activity(Sector.street_work, "harvesting")


def test_only_reporters_of_identifying_agencies_may_report():
    from shared.access import Resource, allowed
    from shared.auth import Claims

    def may_report(agency, roles):
        return bool(allowed(Claims(sub="x", agency=agency, municipality="prizren", roles=roles), "case.create",
                            Resource(municipality="prizren")))

    assert may_report(AgencyType.police, ("reporter",))
    assert not may_report(AgencyType.police, ("caseworker",))
    assert not may_report(AgencyType.prosecution, ("reporter",))
    assert not may_report(AgencyType.coordinator, ("reporter",))
    assert rules.identifying_agencies() == {AgencyType.police, AgencyType.labour_inspectorate, AgencyType.csw,
                                            AgencyType.education, AgencyType.ngo}


# --- encryption ---------------------------------------------------------------------------------


def test_envelope_encryption_round_trip_and_binding_to_the_case():
    cipher = CaseCipher(os.urandom(32))
    case_id, other = uuid.uuid4(), uuid.uuid4()
    sealed = cipher.seal(case_id, b'{"given_name":"Arber"}')
    assert b"Arber" not in sealed.ciphertext and b"Arber" not in sealed.wrapped_key
    assert cipher.open(case_id, ciphertext=sealed.ciphertext, wrapped_key=sealed.wrapped_key) == b'{"given_name":"Arber"}'
    with pytest.raises(DecryptionError):
        cipher.open(other, ciphertext=sealed.ciphertext, wrapped_key=sealed.wrapped_key)
    with pytest.raises(DecryptionError):
        CaseCipher(os.urandom(32)).open(case_id, ciphertext=sealed.ciphertext, wrapped_key=sealed.wrapped_key)
    # each case has its own data key: another case's key does not open this ciphertext
    sealed2 = cipher.seal(case_id, b"x")
    assert sealed2.wrapped_key != sealed.wrapped_key


def test_master_key_from_settings_parses_and_bad_keys_are_named():
    assert len(parse_master_key(Settings(_env_file=None).encryption_master_key.get_secret_value())) == 32
    with pytest.raises(ValueError, match="32 bytes"):
        parse_master_key(base64.urlsafe_b64encode(b"short").decode())


# --- request validation -----------------------------------------------------------------------------


def body(**over):
    b = {
        "municipality": "prizren",
        "identified_on": date.today().isoformat(),
        "child": {"given_name": "Arbër", "family_name": "Krasniqi", "estimated_age": 12, "sex": "male"},
        "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection", "hazardous": True},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            b[k] = {**b[k], **v}
        else:
            b[k] = v
    return b


def errors_of(raw) -> str:
    with pytest.raises(ValidationError) as exc:
        IdentificationRequest.model_validate(raw)
    return describe_validation_error(exc.value)


def test_a_valid_identification_derives_age():
    req = IdentificationRequest.model_validate(body())
    assert req.age == 12 and req.birth_year == date.today().year - 12


@pytest.mark.parametrize("override,needle", [
    ({"municipality": "atlantis"}, "municipality: unknown municipality 'atlantis'"),
    ({"child": {"sex": "x"}}, "child.sex: Input should be 'female', 'male', 'other' or 'unknown'"),
    ({"child": {"estimated_age": 18}}, "child.estimated_age"),
    ({"child": {"estimated_age": None}}, "give date_of_birth"),
    ({"child": {"estimated_age": None, "date_of_birth": "2001-01-01"}}, "child.date_of_birth: the child was"),
    ({"identified_on": (date.today() + timedelta(days=3)).isoformat()}, "identified_on: must not be in the future"),
    ({"work": {"sector": "mining"}}, "work.sector: Input should be 'street_work'"),
    ({"work": {"activity": "harvesting"}}, "allowed: scrap_collection, waste_picking"),
    ({"surname": "x"}, "surname: Extra inputs are not permitted"),
])
def test_invalid_identifications_name_the_field_and_allowed_values(override, needle):
    assert needle in errors_of(body(**override))


def test_update_needs_sector_and_activity_together():
    with pytest.raises(ValidationError, match="give both"):
        UpdatedIn.model_validate({"type": "updated", "sector": "begging"})
    assert UpdatedIn.model_validate({"type": "updated", "hazardous": True}).hazardous is True


def test_inbound_envelope_source_must_be_an_identifying_agency_office():
    ok = InboundEnvelope.model_validate({"specversion": "1.0", "id": "a-1", "source": "police/prizren",
                                         "type": "identification.submitted", "data": {}})
    assert ok.agency is AgencyType.police and ok.municipality == "prizren"
    assert ok.dedupe_id == InboundEnvelope.model_validate(ok.model_dump()).dedupe_id
    with pytest.raises(ValidationError, match="does not identify children"):
        InboundEnvelope.model_validate({**ok.model_dump(), "source": "prosecution/prizren"})
    with pytest.raises(ValidationError, match="type"):
        InboundEnvelope.model_validate({**ok.model_dump(), "type": "case.identified"})


def test_a_replayed_redaction_note_is_rejected_with_a_clear_reason():
    from services.intake.inbound import InboundGate
    from services.intake.service import InboundRejected, parse_inbound
    from services.intake.worker import REDACTED
    from shared.inbound import sign_event

    gate = InboundGate.build(Settings(_env_file=None, CLMS_ENV="test"))
    with pytest.raises(InboundRejected) as exc:
        parse_inbound(REDACTED, gate=gate)
    assert exc.value.reason == "redacted_replay"
    from shared.inbound import dev_sender_key

    with pytest.raises(InboundRejected) as exc:
        parse_inbound(sign_event({"specversion": "1.0", "type": "identification.submitted", "id": "x",
                                  "source": "police/prizren", "data": {"municipality": "prizren"}},
                                 dev_sender_key("police/prizren")), gate=gate)
    assert exc.value.reason == "invalid_identification" and "data.identified_on" in exc.value.error
