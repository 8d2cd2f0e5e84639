"""Settings, auth tokens and the reference data the product ships."""

from __future__ import annotations

import json
import time

import jwt
import pytest

from shared.auth import Claims, TokenError, Verifier, mint_token
from shared.kafka import connection_kwargs, make_consumer, make_producer
from shared.reference import REFERENCE_DIR, agency_offices, municipalities, office_serving
from shared.settings import Settings
from shared.streams import broker_credentials


def settings(**env) -> Settings:
    return Settings(_env_file=None, **env)  # type: ignore[call-arg]


def test_production_refuses_placeholder_secrets():
    with pytest.raises(ValueError, match="JWT_SECRET still holds the development placeholder"):
        settings(CLMS_ENV="production")
    ok = settings(CLMS_ENV="production", JWT_SECRET="x" * 40, CHILD_REF_KEY="y" * 40,
                  ENCRYPTION_MASTER_KEY="QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", WEBHOOK_SECRET="z" * 40,
                  IDEMPOTENCY_HMAC_KEY="w" * 40)
    assert ok.environment == "production"


def test_missing_infrastructure_is_explained():
    with pytest.raises(RuntimeError, match="KAFKA_BOOTSTRAP_SERVERS is not set"):
        settings().require_kafka()


async def test_sasl_settings_reach_aiokafka_and_faust():
    s = settings(KAFKA_BOOTSTRAP_SERVERS="kafka:9093", KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                 KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="referral",
                 KAFKA_SASL_PASSWORD="s3cret")
    kw = connection_kwargs(s)
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("referral", "s3cret")
    assert kw["ssl_context"] is not None
    producer = make_producer(s)
    assert producer.client._sasl_mechanism == "SCRAM-SHA-512"
    assert producer.client._sasl_plain_username == "referral"
    consumer = make_consumer(s, "t", group="g")
    assert consumer._client._security_protocol == "SASL_SSL"
    creds = broker_credentials(s)
    assert creds.username == "referral" and creds.password == "s3cret"
    assert str(creds.mechanism.value) == "SCRAM-SHA-512"


def test_token_round_trip_and_rejections():
    s = settings()
    tok = mint_token(s, sub="police.prizren.duty", agency="police", municipality="prizren", roles=["reporter"])
    claims = Verifier(s).verify(tok)
    assert claims == Claims(sub="police.prizren.duty", agency="police", municipality="prizren", roles=("reporter",))
    other = settings(JWT_SECRET="another-secret-that-is-long-enough-000")
    with pytest.raises(TokenError, match="invalid token"):
        Verifier(other).verify(tok)
    expired = jwt.encode({"sub": "x", "agency": "police", "municipality": "prizren", "roles": [],
                          "iss": s.jwt_issuer, "aud": s.jwt_audiences, "iat": int(time.time()) - 70,
                          "exp": int(time.time()) - 10},
                         s.jwt_secret.get_secret_value(), algorithm="HS256")
    with pytest.raises(TokenError, match="expired"):
        Verifier(s).verify(expired)
    bad_agency = jwt.encode({"sub": "x", "agency": "army", "municipality": "prizren", "roles": [],
                             "iss": s.jwt_issuer, "aud": s.jwt_audiences, "iat": int(time.time()),
                             "exp": int(time.time()) + 60},
                            s.jwt_secret.get_secret_value(), algorithm="HS256")
    with pytest.raises(TokenError, match="agency"):
        Verifier(s).verify(bad_agency)


def test_38_municipalities_with_unique_slugs_and_every_agency_office():
    ms = municipalities()
    assert len(ms) == 38
    assert ms["prizren"].name_sr == "Prizren" and ms["prizren"].population > 100_000
    agencies = {"police", "csw", "education", "labour_inspectorate", "prosecution", "ngo", "coordinator"}
    assert {o.agency for o in agency_offices().values()} == agencies
    for slug in ms:
        for a in agencies:
            assert office_serving(a, slug).office_id == f"{a}.{slug}"
    with pytest.raises(KeyError, match="no csw office serves"):
        office_serving("csw", "atlantis")


def test_the_map_ships_38_municipalities_with_attribution():
    geo = json.loads((REFERENCE_DIR / "kosovo_municipalities.geojson").read_text())
    assert len(geo["features"]) == 38
    assert "CC BY-SA" in (REFERENCE_DIR / "SOURCES.md").read_text()
