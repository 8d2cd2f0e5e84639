"""The inbound protocol (issues 15 and 16): an agency system's identification is signed by its
office (JWS ES256) and carries its personal part encrypted to intake (JWE ECDH-ES + A256GCM).
Intake opens only what its office signed, and refuses plaintext personal data outside
development; the reasons name fields, never values."""

from __future__ import annotations

from datetime import date

import orjson
import pytest
import yaml
from jwcrypto import jwk

from shared.inbound import dev_sender_key, inbound_message, seal_identification, sign_event
from shared.settings import Settings
from services.intake.inbound import InboundGate, public_key
from services.intake.service import InboundRejected, parse_inbound

NAME, FAMILY, PHONE, DOB = "Arbër", "Krasniqi", "+383 44 123 456", "2014-03-09"


def body(municipality: str = "prizren") -> dict:
    return {
        "municipality": municipality, "identified_on": date.today().isoformat(), "report_source": "officer",
        "child": {"given_name": NAME, "family_name": FAMILY, "date_of_birth": DOB, "sex": "male",
                  "community": "roma", "school_status": "dropped_out",
                  "guardian": {"name": "Shpresa Krasniqi", "relationship": "mother", "phone": PHONE}},
        "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection", "hazardous": True},
        "notes": "seen near the bus station",
    }


def event(**over) -> dict:
    ev = {"specversion": "1.0", "id": "kp-1", "source": "police/prizren", "type": "identification.submitted",
          "reportedby": "police.prizren.officer17", "data": body()}
    ev.update(over)
    return ev


def settings(env: str = "test", **extra) -> Settings:
    return Settings(_env_file=None, CLMS_ENV=env, **extra)


@pytest.fixture(scope="module")
def gate() -> InboundGate:
    return InboundGate.build(settings())


def refused(raw: bytes, gate: InboundGate) -> InboundRejected:
    with pytest.raises(InboundRejected) as exc:
        parse_inbound(raw, gate=gate)
    for secret in (NAME, FAMILY, PHONE, DOB, "Shpresa"):
        assert secret not in exc.value.error
    return exc.value


def test_a_signed_encrypted_identification_opens_to_the_same_request(gate):
    raw = inbound_message(event(), recipient=public_key(settings()))
    for secret in (NAME, FAMILY, PHONE, DOB, "Shpresa", "bus station"):
        assert secret.encode() not in raw
    env, request = parse_inbound(raw, gate=gate)
    assert env.source == "police/prizren" and env.reportedby == "police.prizren.officer17"
    assert request.child.given_name == NAME and request.child.date_of_birth == date(2014, 3, 9)
    assert request.child.guardian.phone == PHONE and request.notes == "seen near the bus station"
    assert request.child.sex.value == "male" and request.work.hazardous is True


def test_plaintext_personal_data_is_refused_outside_development_naming_the_fields(gate):
    raw = sign_event(event(), dev_sender_key("police/prizren"))
    exc = refused(raw, gate)
    assert exc.reason == "plaintext_personal_data"
    assert "data.child.given_name" in exc.error and "data.child.guardian" in exc.error and "data.notes" in exc.error
    # and in development it is still accepted, for trying the system by hand
    _, request = parse_inbound(raw, gate=InboundGate.build(settings("development")))
    assert request.child.family_name == FAMILY


def test_plaintext_next_to_an_encrypted_part_is_refused(gate):
    sealed = seal_identification(body(), public_key(settings()))
    sealed["child"]["given_name"] = NAME
    exc = refused(sign_event(event(data=sealed), dev_sender_key("police/prizren")), gate)
    assert exc.reason == "plaintext_personal_data" and "data.child.given_name" in exc.error


def test_unsigned_forged_and_tampered_events_are_unauthenticated(gate):
    pub = public_key(settings())
    unsigned = orjson.dumps(event(data=seal_identification(body(), pub)))
    assert refused(unsigned, gate).reason == "unauthenticated_sender"
    # signed by police/prizren's key, claiming to be police/peje
    forged = inbound_message(event(source="police/peje", reportedby="police.peje.duty"), recipient=pub,
                             sender=dev_sender_key("police/prizren"))
    exc = refused(forged, gate)
    assert exc.reason == "unauthenticated_sender" and "police/prizren" in exc.error
    # a key with no kid does not help: it must verify with a key of the claimed office
    anon = jwk.JWK(**{k: v for k, v in dev_sender_key("police/prizren").export(as_dict=True).items() if k != "kid"})
    assert refused(inbound_message(event(source="police/peje", reportedby=None), recipient=pub, sender=anon),
                   gate).reason == "unauthenticated_sender"
    # changed after signing: municipality swapped in the payload, signature kept
    good = inbound_message(event(), recipient=pub).decode()
    header, payload, sig = good.split(".")
    import base64

    doc = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["data"]["work"]["hazardous"] = False
    tampered = f"{header}.{base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip('=')}.{sig}".encode()
    assert refused(tampered, gate).reason == "unauthenticated_sender"
    # an officer of another office cannot be named as the reporter
    other = inbound_message(event(reportedby="police.peje.duty"), recipient=pub)
    exc = refused(other, gate)
    assert exc.reason == "unauthenticated_sender" and "reportedby" in exc.error


def test_a_personal_part_for_another_key_cannot_be_opened(gate):
    stranger = jwk.JWK.generate(kty="EC", crv="P-256")
    raw = inbound_message(event(), recipient=stranger.export_public(as_dict=True))
    exc = refused(raw, gate)
    assert exc.reason == "undecryptable_personal_data" and "clms inbound-key" in exc.error


def test_a_registry_file_replaces_the_development_keys(tmp_path):
    agency_key = jwk.JWK.generate(kty="EC", crv="P-256", kid="kp-prizren-2026")
    path = tmp_path / "senders.yaml"
    path.write_text(yaml.safe_dump({"senders": {"police/prizren": [agency_key.export_public(as_dict=True)]}}))
    s = settings(INBOUND_SENDERS_FILE=str(path))
    gate = InboundGate.build(s)
    pub = public_key(s)
    env, _ = parse_inbound(inbound_message(event(), recipient=pub, sender=agency_key), gate=gate)
    assert env.source == "police/prizren"
    # the public development keys are no longer accepted
    assert refused(inbound_message(event(), recipient=pub), gate).reason == "unauthenticated_sender"
    # an office without a registered key cannot publish at all
    exc = refused(inbound_message(event(source="police/peje", reportedby=None), recipient=pub,
                                  sender=agency_key), gate)
    assert exc.reason == "unauthenticated_sender"
    # a private key in the registry is a mistake that is refused at start
    path.write_text(yaml.safe_dump({"senders": {"police/prizren": [agency_key.export(as_dict=True)]}}))
    with pytest.raises(ValueError, match="private key"):
        InboundGate.build(s)


def test_production_requires_intakes_key_and_the_sender_registry(tmp_path):
    secrets = {"JWT_SECRET": "j" * 40, "CHILD_REF_KEY": "c" * 40, "WEBHOOK_SECRET": "w" * 40,
               "IDEMPOTENCY_HMAC_KEY": "i" * 40, "ENCRYPTION_MASTER_KEY": "bWFzdGVyLWtleS1vZi10ZXN0cy0zMi1ieXRlcy0hIQ=="}
    with pytest.raises(ValueError, match="INBOUND_JWE_PRIVATE_KEY is required"):
        InboundGate.build(settings("production", **secrets))
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    with pytest.raises(ValueError, match="INBOUND_SENDERS_FILE is required"):
        InboundGate.build(settings("production", INBOUND_JWE_PRIVATE_KEY=key.export(), **secrets))
    pem = key.export_to_pem(private_key=True, password=None).decode()
    assert public_key(settings("production", INBOUND_JWE_PRIVATE_KEY=pem, **secrets))["x"] == key.get("x")
