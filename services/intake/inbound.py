"""Intake's side of clms.agency-inbound: who sent an identification, and its personal part.

- **Sender**: every message is a JWS (ES256) signed with a key registered for the sending
  agency office (INBOUND_SENDERS_FILE: office -> public JWKs). The CloudEvent's `source` must be
  the office of the key that signed it, and `reportedby` one of that office's officers
  (`<agency>.<municipality>.<name>`). Without a registry file outside production, the
  development keys of shared.inbound.dev_sender_key are registered for every office.
- **Personal part**: `data.personal` is a JWE (ECDH-ES + A256GCM) to intake's key
  (INBOUND_JWE_PRIVATE_KEY; outside production, without one, a key derived from
  ENCRYPTION_MASTER_KEY). Personal fields in plaintext are refused outside development.

Every refusal raises `InboundRejected(reason, error)`; the error names the field, never a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from jwcrypto import jwe, jwk, jws
from jwcrypto.common import JWException
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.events import describe_validation_error
from shared.inbound import (
    CHILD_PERSONAL,
    CONTENT_ENC,
    KEY_ALG,
    SIGNING_ALG,
    TOP_PERSONAL,
    derived_p256_key,
    dev_sender_key,
)
from shared.settings import Environment, Settings
from services.intake import rules

UNAUTHENTICATED = "unauthenticated_sender"
PLAINTEXT = "plaintext_personal_data"
UNDECRYPTABLE = "undecryptable_personal_data"
SIGN_HINT = ("sign the CloudEvent as a JWS (ES256, compact) with a key registered for your office "
             "(README, 'Agency systems')")


class InboundRejected(Exception):
    """An inbound message that can never become a case: dead-letter it with reason and error."""

    def __init__(self, reason: str, error: str):
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


# --- keys --------------------------------------------------------------------------------------


def _load_private_key(text: str) -> jwk.JWK:
    text = text.strip()
    try:
        key = jwk.JWK.from_json(text) if text.startswith("{") else jwk.JWK.from_pem(text.encode())
    except (ValueError, TypeError, JWException) as exc:
        raise ValueError("INBOUND_JWE_PRIVATE_KEY is neither a private JWK (JSON) nor a PEM private key: "
                         f"{type(exc).__name__}; generate one with `clms inbound-key --generate`") from None
    if not key.has_private or key.get("kty") != "EC" or key.get("crv") != "P-256":
        raise ValueError("INBOUND_JWE_PRIVATE_KEY must be a private EC P-256 key (ECDH-ES); "
                         "generate one with `clms inbound-key --generate`")
    return key


def decryption_key(settings: Settings) -> jwk.JWK:
    """Intake's private key for the personal part of inbound identifications."""
    given = settings.inbound_jwe_private_key
    if given is not None and given.get_secret_value().strip():
        key = _load_private_key(given.get_secret_value())
    elif settings.environment is Environment.production:
        raise ValueError("INBOUND_JWE_PRIVATE_KEY is required with CLMS_ENV=production; "
                         "generate one with `clms inbound-key --generate`")
    else:
        # development and tests: derived from the master key, so every intake replica and the
        # `clms inbound-key` command agree without a key file (and a real master key gives a
        # secret key); no production deployment uses it (required above)
        seed = hmac.new(settings.encryption_master_key.get_secret_value().encode(),
                        b"clms inbound JWE development key", hashlib.sha256).digest()
        key = derived_p256_key(seed)
    kid = key.get("kid") or key.thumbprint()
    return jwk.JWK(**{**key.export(as_dict=True), "kid": kid, "use": "enc", "alg": KEY_ALG})


def public_key(settings: Settings) -> dict[str, Any]:
    """What `clms inbound-key` prints: the JWK agency systems encrypt personal parts to."""
    return decryption_key(settings).export_public(as_dict=True)


@dataclass
class SenderRegistry:
    """Agency office (`police/prizren`) -> the public keys its systems sign with."""

    keys: dict[str, list[jwk.JWK]]
    development: bool = False  # the derived development keys (public knowledge)
    by_kid: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for office, keys in self.keys.items():
            for k in keys:
                kid = k.get("kid")
                if kid:
                    if kid in self.by_kid and self.by_kid[kid] != office:
                        raise ValueError(f"INBOUND_SENDERS_FILE: kid {kid!r} is registered for two offices "
                                         f"({self.by_kid[kid]} and {office}); give each key its own kid")
                    self.by_kid[kid] = office

    @classmethod
    def development_keys(cls) -> "SenderRegistry":
        return cls({}, development=True)

    @classmethod
    def from_file(cls, path: Path) -> "SenderRegistry":
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ValueError(f"INBOUND_SENDERS_FILE {path}: cannot read it ({exc.strerror})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("senders"), dict):
            raise ValueError(f"INBOUND_SENDERS_FILE {path}: expected a mapping `senders: {{<agency>/<municipality>: "
                             "[<public JWK>, ...]}}`")
        from shared.reference import municipality_slugs

        identifying = {a.value for a in rules.identifying_agencies()}
        slugs = set(municipality_slugs())
        out: dict[str, list[jwk.JWK]] = {}
        for office, entries in doc["senders"].items():
            agency, _, municipality = str(office).partition("/")
            if agency not in identifying or municipality not in slugs:
                raise ValueError(f"INBOUND_SENDERS_FILE {path}: {office!r} is not an identifying agency office "
                                 f"(<agency>/<municipality>, agency one of {', '.join(sorted(identifying))})")
            keys = []
            for i, entry in enumerate(entries or []):
                try:
                    k = jwk.JWK(**entry)
                except (TypeError, ValueError, JWException) as exc:
                    raise ValueError(f"INBOUND_SENDERS_FILE {path}: {office}[{i}] is not a JWK: {exc}") from None
                if k.has_private:
                    raise ValueError(f"INBOUND_SENDERS_FILE {path}: {office}[{i}] contains a private key; register "
                                     "only the public part (the agency keeps the private key)")
                if k.get("kty") != "EC" or k.get("crv") != "P-256":
                    raise ValueError(f"INBOUND_SENDERS_FILE {path}: {office}[{i}] must be an EC P-256 key (ES256)")
                keys.append(k)
            out[str(office)] = keys
        return cls(out)

    def keys_of(self, office: str) -> list[jwk.JWK]:
        if self.development:
            return [jwk.JWK.from_json(dev_sender_key(office).export_public())]
        return self.keys.get(office, [])

    def office_of(self, kid: str | None) -> str | None:
        if not kid:
            return None
        if self.development:
            return kid.removeprefix("dev:") if kid.startswith("dev:") else None
        return self.by_kid.get(kid)


def sender_registry(settings: Settings) -> SenderRegistry:
    if settings.inbound_senders_file is not None:
        return SenderRegistry.from_file(settings.inbound_senders_file)
    if settings.environment is Environment.production:
        raise ValueError("INBOUND_SENDERS_FILE is required with CLMS_ENV=production: the agency offices' public "
                         "signing keys (README, 'Agency systems')")
    return SenderRegistry.development_keys()


# --- opening a message -------------------------------------------------------------------------


class PersonalIn(BaseModel):
    """The decrypted personal part: exactly IdentificationRequest.personal()."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    given_name: Any = None
    family_name: Any = None
    date_of_birth: Any = None
    guardian: Any = None
    notes: Any = None


def _b64json(part: str) -> Any:
    try:
        return orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None


@dataclass
class InboundGate:
    decrypt_key: jwk.JWK
    senders: SenderRegistry
    allow_plaintext: bool

    @classmethod
    def build(cls, settings: Settings) -> "InboundGate":
        return cls(decrypt_key=decryption_key(settings), senders=sender_registry(settings),
                   allow_plaintext=settings.environment is Environment.development)

    # 1. who sent it -------------------------------------------------------------------------
    def verify(self, raw: bytes) -> dict[str, Any]:
        """The CloudEvent (a dict) once its signature is checked against its claimed office."""
        text = raw.strip()
        if text.startswith(b"{"):
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise InboundRejected("invalid_json", f"invalid JSON: {exc}") from None
            if isinstance(doc, dict) and "redacted" in doc and "type" not in doc:
                raise InboundRejected(
                    "redacted_replay", "this is the redaction note of an earlier inbound dead letter, not an "
                                       "identification: have the agency system re-send the original (same source "
                                       "and id are deduplicated) or replay it with `clms dlq replay`, which "
                                       "re-publishes the original from the inbound topic")
            raise InboundRejected(UNAUTHENTICATED, f"the message is an unsigned JSON document: {SIGN_HINT}")
        parts = text.split(b".")
        if len(parts) != 3:
            raise InboundRejected("invalid_message", "the message is neither a JWS compact serialization "
                                                    f"(header.payload.signature) nor JSON: {SIGN_HINT}")
        header = _b64json(parts[0].decode(errors="replace"))
        claimed = _b64json(parts[1].decode(errors="replace"))
        if not isinstance(header, dict) or header.get("alg") != SIGNING_ALG:
            raise InboundRejected(UNAUTHENTICATED, f"the JWS header must name alg {SIGNING_ALG}: {SIGN_HINT}")
        if not isinstance(claimed, dict):
            raise InboundRejected("invalid_json", "the JWS payload is not a JSON object (a CloudEvent)")
        source = claimed.get("source")
        if not isinstance(source, str):
            raise InboundRejected("invalid_envelope", "source: required, <agency>/<municipality> of the sending office")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        signer = self.senders.office_of(kid)
        if signer is not None and signer != source:
            raise InboundRejected(UNAUTHENTICATED, f"source {source!r} does not match the office of the signing key "
                                                  f"(kid {kid!r} is registered for {signer!r})")
        keys = self.senders.keys_of(source)
        if kid is not None and signer == source:
            keys = [k for k in keys if k.get("kid") == kid] or keys
        if not keys:
            raise InboundRejected(UNAUTHENTICATED, f"no signing key is registered for source {source!r} "
                                                  "(INBOUND_SENDERS_FILE)")
        for key in keys:
            token = jws.JWS()
            try:
                token.deserialize(text.decode(), key=key, alg=SIGNING_ALG)
            except (JWException, ValueError):
                continue
            return orjson.loads(token.payload)
        raise InboundRejected(UNAUTHENTICATED, f"the signature does not verify with any key registered for "
                                              f"{source!r}: the event was changed after signing, or signed with "
                                              "another office's key")

    # 2. the personal part ---------------------------------------------------------------------
    def open_data(self, data: Any) -> Any:
        """`data` with its personal part decrypted back into place (an identification body)."""
        if not isinstance(data, dict):
            return data
        child = data.get("child") if isinstance(data.get("child"), dict) else {}
        plain = [f"data.child.{n}" for n in CHILD_PERSONAL if child.get(n) is not None]
        plain += [f"data.{n}" for n in TOP_PERSONAL if data.get(n) is not None]
        sealed = data.get("personal")
        if sealed is None:
            if plain and not self.allow_plaintext:
                raise InboundRejected(PLAINTEXT, f"{', '.join(plain)}: personal data in plaintext is refused outside "
                                                "development; encrypt the personal part to intake's key "
                                                "(`clms inbound-key`) as data.personal (JWE, ECDH-ES + A256GCM)")
            return data
        if plain:
            raise InboundRejected(PLAINTEXT, f"{', '.join(plain)}: personal data in plaintext next to the "
                                            "encrypted data.personal; send personal fields only inside data.personal")
        if not isinstance(sealed, str):
            raise InboundRejected(UNDECRYPTABLE, "data.personal: expected a JWE compact serialization (a string)")
        token = jwe.JWE(algs=[KEY_ALG, CONTENT_ENC])
        try:
            token.deserialize(sealed, key=self.decrypt_key)
            personal = PersonalIn.model_validate(orjson.loads(token.payload))
        except ValidationError as exc:
            raise InboundRejected("invalid_identification",
                                 describe_validation_error(exc, prefix="data.personal.")) from None
        except (JWException, ValueError, TypeError, orjson.JSONDecodeError):
            raise InboundRejected(UNDECRYPTABLE, "data.personal: cannot be decrypted with intake's key "
                                                f"(kid {self.decrypt_key.get('kid')}); encrypt with ECDH-ES + "
                                                "A256GCM to the key `clms inbound-key` prints") from None
        opened = {k: v for k, v in data.items() if k != "personal"}
        values = personal.model_dump(mode="json", exclude_none=True)
        opened["child"] = {**child, **{n: values[n] for n in CHILD_PERSONAL if n in values}}
        opened.update({n: values[n] for n in TOP_PERSONAL if n in values})
        return opened

    def check_reporter(self, *, agency: str, municipality: str, reportedby: str | None) -> None:
        if reportedby is not None and not reportedby.startswith(f"{agency}.{municipality}."):
            raise InboundRejected(UNAUTHENTICATED, f"reportedby must name an officer of the sending office "
                                                  f"({agency}.{municipality}.<name>)")
