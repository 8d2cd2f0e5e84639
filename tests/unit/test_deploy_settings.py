"""Broker security settings reach aiokafka and faust; placeholder secrets stop production."""

from __future__ import annotations

import datetime as dt
import ssl

import faust
import pytest
from pydantic import ValidationError

from shared.kafka import connection_kwargs, make_consumer, make_producer
from shared.settings import Settings
from shared.streams import broker_credentials, make_faust_app

REAL = {
    "JWT_SECRET": "a-real-jwt-secret-of-enough-length-0123456789",
    "CHILD_REF_KEY": "a-real-child-ref-key-0123456789abcdef",
    "ENCRYPTION_MASTER_KEY": "q83vEjRWeJC6ze8SNFZ4kLrN7xI0VniQus3vEjRWeJA=",
    "WEBHOOK_SECRET": "a-real-webhook-secret-0123456789",
    "IDEMPOTENCY_HMAC_KEY": "a-real-idempotency-hmac-key-0123456789",
}


@pytest.fixture(scope="module")
def cafile(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clms test kafka CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture
def sasl_ssl(cafile) -> Settings:
    return Settings(_env_file=None, KAFKA_BOOTSTRAP_SERVERS="kafka-0:9093,kafka-1:9093",
                    KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                    KAFKA_SASL_USERNAME="referral", KAFKA_SASL_PASSWORD="s3cret-hex",
                    KAFKA_SSL_CAFILE=cafile)


def ca_subjects(ctx: ssl.SSLContext) -> list:
    return [c["subject"] for c in ctx.get_ca_certs()]


def test_connection_kwargs_carry_sasl_scram_and_the_ca(sasl_ssl):
    kw = connection_kwargs(sasl_ssl)
    assert kw["bootstrap_servers"] == "kafka-0:9093,kafka-1:9093"
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("referral", "s3cret-hex")
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ((("commonName", "clms test kafka CA"),),) in ca_subjects(ctx)


async def test_producer_and_consumer_are_built_with_the_credentials(sasl_ssl):
    for client in (make_producer(sasl_ssl).client, make_consumer(sasl_ssl, "t", group="referral")._client):
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "referral" and client._sasl_plain_password == "s3cret-hex"
        assert ((("commonName", "clms test kafka CA"),),) in ca_subjects(client._ssl_context)


def test_faust_app_gets_the_same_credentials(sasl_ssl):
    creds = broker_credentials(sasl_ssl)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert (creds.username, creds.password) == ("referral", "s3cret-hex")
    assert ((("commonName", "clms test kafka CA"),),) in ca_subjects(creds.ssl_context)
    app = make_faust_app(sasl_ssl, "referral")
    conf_creds = app.conf.broker_credentials
    assert conf_creds.username == "referral" and conf_creds.mechanism.value == "SCRAM-SHA-512"
    assert [str(u) for u in app.conf.broker] == ["kafka://kafka-0:9093", "kafka://kafka-1:9093"]
    assert app.conf.id == "referral"


def test_plaintext_settings_send_no_credentials():
    s = Settings(_env_file=None, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9092")
    kw = connection_kwargs(s)
    assert kw["security_protocol"] == "PLAINTEXT" and "sasl_mechanism" not in kw and "ssl_context" not in kw
    assert broker_credentials(s) is None


@pytest.mark.parametrize("variable", list(REAL))
def test_production_refuses_a_placeholder_secret_naming_the_variable(variable):
    defaults = Settings(_env_file=None)
    placeholder = getattr(defaults, variable.lower()).get_secret_value()
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=None, CLMS_ENV="production", **{**REAL, variable: placeholder})
    assert variable in str(err.value)


def test_production_accepts_real_secrets_and_compose_not_used_markers():
    assert Settings(_env_file=None, CLMS_ENV="production", **REAL).environment.value == "production"
    # docker-compose/k8s hand services a marker instead of secrets they do not use
    Settings(_env_file=None, CLMS_ENV="production", JWT_SECRET=REAL["JWT_SECRET"],
             CHILD_REF_KEY="not-used-by-analytics", ENCRYPTION_MASTER_KEY="not-used-by-analytics",
             WEBHOOK_SECRET="not-used-by-analytics", IDEMPOTENCY_HMAC_KEY="not-used-by-analytics")
