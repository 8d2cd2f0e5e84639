"""The agency side of clms.agency-inbound: how an agency system publishes an identification.

An inbound message is a JWS (RFC 7515, compact serialization, ES256) signed with the sending
office's registered key, whose payload is a CloudEvents 1.0 JSON `identification.submitted`.
Its `data` is the body of `POST /v1/identifications` with the personal part taken out and put,
encrypted to intake's public key, in `data.personal`: a JWE (RFC 7516, compact, ECDH-ES +
A256GCM) of `{"given_name", "family_name", "date_of_birth", "guardian", "notes"}`.

Any language has a JOSE library for both (README, "Agency systems"); this module is the Python
version, used by the tests, `clms demo` and the benchmarks, and shown in the README.

Development sender keys (`dev_sender_key`) are derived from the office name alone: anyone can
compute them, so they are accepted only without a registry file outside production
(services/intake/inbound.py).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe, jwk, jws
from jwcrypto.common import json_encode

SIGNING_ALG = "ES256"
KEY_ALG = "ECDH-ES"
CONTENT_ENC = "A256GCM"
# the fields of an identification that are personal (IdentificationRequest.personal()):
# under data.child ...
CHILD_PERSONAL = ("given_name", "family_name", "date_of_birth", "guardian")
# ... and at the top of data
TOP_PERSONAL = ("notes",)
CONTENT_TYPE = b"application/jose"  # Kafka header content-type of an inbound message

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derived_p256_key(seed: bytes) -> jwk.JWK:
    """A P-256 private key derived deterministically from `seed` (SHA-256, reduced mod n)."""
    d = int.from_bytes(hashlib.sha256(seed).digest(), "big") % (_P256_ORDER - 1) + 1
    return jwk.JWK.from_pyca(ec.derive_private_key(d, ec.SECP256R1()))


def dev_sender_kid(source: str) -> str:
    return f"dev:{source}"


def dev_sender_key(source: str) -> jwk.JWK:
    """The development signing key of an agency office (`police/prizren`). Public knowledge:
    never accepted in production, nor where a sender registry file is configured."""
    key = derived_p256_key(b"clms development inbound sender key:" + source.encode())
    return jwk.JWK(**{**key.export(as_dict=True), "kid": dev_sender_kid(source)})


def split_personal(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the identification without its personal fields, the personal fields)."""
    rest = copy.deepcopy(data)
    child = rest.get("child") if isinstance(rest.get("child"), dict) else {}
    personal: dict[str, Any] = {}
    for name in CHILD_PERSONAL:
        if name in child:
            personal[name] = child.pop(name)
    for name in TOP_PERSONAL:
        if name in rest:
            personal[name] = rest.pop(name)
    return rest, personal


def encrypt_personal(personal: dict[str, Any], recipient: jwk.JWK | dict | str) -> str:
    """JWE compact (ECDH-ES + A256GCM) of the personal fields, to intake's public key."""
    key = recipient if isinstance(recipient, jwk.JWK) else (
        jwk.JWK.from_json(recipient) if isinstance(recipient, str) else jwk.JWK(**recipient))
    header = {"alg": KEY_ALG, "enc": CONTENT_ENC, "cty": "application/json"}
    if key.get("kid"):
        header["kid"] = key.get("kid")
    token = jwe.JWE(orjson.dumps(personal), protected=json_encode(header))
    token.add_recipient(key)
    return token.serialize(compact=True)


def seal_identification(data: dict[str, Any], recipient: jwk.JWK | dict | str) -> dict[str, Any]:
    """An identification body with its personal part encrypted into `personal`."""
    rest, personal = split_personal(data)
    return {**rest, "personal": encrypt_personal(personal, recipient)}


def sign_event(event: dict[str, Any], key: jwk.JWK) -> bytes:
    """The message value: JWS compact (ES256) of the CloudEvent, with the key's kid."""
    header = {"alg": SIGNING_ALG, "typ": "JOSE", "cty": "application/cloudevents+json"}
    if key.get("kid"):
        header["kid"] = key.get("kid")
    token = jws.JWS(orjson.dumps(event))
    token.add_signature(key, None, json_encode(header))
    return token.serialize(compact=True).encode()


def inbound_message(event: dict[str, Any], *, recipient: jwk.JWK | dict | str,
                    sender: jwk.JWK | None = None) -> bytes:
    """Encrypt the personal part of `event["data"]` and sign the event: what an agency system
    publishes. `sender` defaults to the development key of the event's `source`."""
    sealed = {**event, "data": seal_identification(event["data"], recipient)}
    return sign_event(sealed, sender or dev_sender_key(event["source"]))


def public_jwk(key: jwk.JWK) -> dict[str, Any]:
    return key.export_public(as_dict=True)
