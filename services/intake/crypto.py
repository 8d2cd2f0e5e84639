"""Per-case envelope encryption (AES-256-GCM, `cryptography`), master keys with key ids, and the
per-case child token.

Each case gets its own random 256-bit data key. The personal data of the case (names, date of
birth, guardian contact, notes) is encrypted with it; the data key itself is stored only
wrapped (encrypted) by a master key. Deleting the wrapped key of one case makes that case's
ciphertext unreadable for good (crypto-erasure), including in database backups taken before the
erasure, without touching any other case (what a backup still holds: README, Privacy).

Master keys (ENCRYPTION_MASTER_KEYS = "kid:key,kid:key", the newest last) each carry a key id
(`kid`) stored beside every wrapped key (`intake.case_keys.master_key_id`). New data keys are
wrapped with the newest master key; data keys wrapped with an older one are still unwrapped
with it, so a rotation runs online: add the new key (newest last) on every intake replica, run
`clms keys rotate` (re-wraps every data key under the newest kid), then remove the old key.
A single ENCRYPTION_MASTER_KEY (no kid) is a keyring of one whose kid is derived from the key.

The child token (`ct_...`, published as `child_ref`) is HMAC-SHA256 of the case id under the
case's data key. It is per case (two cases of one child get unrelated tokens) and nobody can
compute or confirm it once erasure destroyed the data key.

Both encryption layers bind the case id as associated data, so a ciphertext or a wrapped key
copied onto another case does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
CHILD_TOKEN_PREFIX = "ct_"
# What an erased case's child_ref becomes in intake's outbox (replayed by `make run`): no token.
ERASED_CHILD_REF = "ct_erased_case_no_token"
_KID = re.compile(r"^[A-Za-z0-9_.\-]{1,40}$")


class DecryptionError(Exception):
    """The data or the wrapped key does not belong to this case or this master key."""


def parse_master_key(value: str) -> bytes:
    """ENCRYPTION_MASTER_KEY: urlsafe base64 of exactly 32 bytes."""
    try:
        raw = base64.urlsafe_b64decode(value.encode() + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("ENCRYPTION_MASTER_KEY must be urlsafe base64 of 32 random bytes") from None
    if len(raw) != 32:
        raise ValueError(f"ENCRYPTION_MASTER_KEY must decode to 32 bytes, not {len(raw)}")
    return raw


def derived_kid(master_key: bytes) -> str:
    """The key id of a master key given without one: reveals nothing of the key."""
    return hashlib.sha256(b"clms-master-key-id|" + master_key).hexdigest()[:16]


def parse_master_keys(value: str) -> list[tuple[str, bytes]]:
    """ENCRYPTION_MASTER_KEYS: `kid:key` entries separated by commas or whitespace, the newest
    last; each key urlsafe base64 of 32 bytes, each kid 1-40 of A-Z a-z 0-9 _ . -, kids unique."""
    out: list[tuple[str, bytes]] = []
    for i, entry in enumerate(e for e in re.split(r"[,\s]+", value.strip()) if e):
        kid, sep, key = entry.partition(":")
        if not sep or not _KID.match(kid):
            raise ValueError(f"ENCRYPTION_MASTER_KEYS entry {i + 1} must be 'kid:key' with a kid of "
                             "letters, digits, '_', '.' or '-' (e.g. 2026-11:<urlsafe base64 of 32 bytes>)")
        try:
            raw = parse_master_key(key)
        except ValueError as exc:
            raise ValueError(f"ENCRYPTION_MASTER_KEYS entry {i + 1} ({kid}): {exc}") from None
        if any(k == kid for k, _ in out):
            raise ValueError(f"ENCRYPTION_MASTER_KEYS: kid {kid!r} appears twice; give each key its own id")
        out.append((kid, raw))
    if not out:
        raise ValueError("ENCRYPTION_MASTER_KEYS is empty; give at least one 'kid:key'")
    return out


def child_token(data_key: bytes, case_id: uuid.UUID) -> str:
    """The per-case token published as child_ref (see the module docstring)."""
    mac = hmac.new(data_key, f"clms-child-token|v1|{case_id}".encode(), hashlib.sha256).hexdigest()
    return CHILD_TOKEN_PREFIX + mac[:40]


@dataclass(frozen=True, slots=True)
class Sealed:
    ciphertext: bytes  # nonce || AES-GCM(data key, personal JSON)
    wrapped_key: bytes  # nonce || AES-GCM(master key, data key)
    master_key_id: str
    token: str  # child_token(data key, case id)


class CaseCipher:
    """A keyring of master keys (newest last) and the per-case operations."""

    def __init__(self, master_key: bytes | Iterable[tuple[str, bytes]]):
        ring = [(derived_kid(master_key), master_key)] if isinstance(master_key, bytes) else list(master_key)
        if not ring:
            raise ValueError("at least one master key is needed")
        self._keys: dict[str, AESGCM] = {}
        for kid, key in ring:
            if len(key) != 32:
                raise ValueError("master key must be 32 bytes")
            self._keys[kid] = AESGCM(key)
        self.master_key_id = ring[-1][0]  # the newest: wraps every new data key

    @classmethod
    def from_settings(cls, settings) -> "CaseCipher":  # noqa: ANN001 - shared.settings.Settings
        many = getattr(settings, "encryption_master_keys", None)
        if many is not None and many.get_secret_value().strip():
            return cls(parse_master_keys(many.get_secret_value()))
        return cls(parse_master_key(settings.encryption_master_key.get_secret_value()))

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @staticmethod
    def _aad(case_id: uuid.UUID, layer: str) -> bytes:
        return f"clms:{layer}:{case_id}".encode()

    def _wrap(self, case_id: uuid.UUID, data_key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._keys[self.master_key_id].encrypt(nonce, data_key, self._aad(case_id, "key"))

    def seal(self, case_id: uuid.UUID, plaintext: bytes) -> Sealed:
        data_key = AESGCM.generate_key(bit_length=256)
        n1 = os.urandom(NONCE_BYTES)
        ciphertext = n1 + AESGCM(data_key).encrypt(n1, plaintext, self._aad(case_id, "pii"))
        return Sealed(ciphertext=ciphertext, wrapped_key=self._wrap(case_id, data_key),
                      master_key_id=self.master_key_id, token=child_token(data_key, case_id))

    def unwrap(self, case_id: uuid.UUID, wrapped_key: bytes, kid: str | None = None) -> bytes:
        """The data key of a case. `kid` names the master key that wrapped it (None: try each)."""
        if kid is not None and kid not in self._keys:
            raise DecryptionError(
                f"the data key of case {case_id} is wrapped by master key {kid!r}, which is not in "
                f"ENCRYPTION_MASTER_KEYS (configured: {', '.join(self._keys)}); add it back, or run "
                "`clms keys rotate` while it is still configured before removing it")
        for name in ([kid] if kid is not None else list(self._keys)):
            try:
                return self._keys[name].decrypt(wrapped_key[:NONCE_BYTES], wrapped_key[NONCE_BYTES:],
                                                self._aad(case_id, "key"))
            except InvalidTag:
                continue
        raise DecryptionError(f"the data key of case {case_id} does not open with this master key")

    def rewrap(self, case_id: uuid.UUID, wrapped_key: bytes, kid: str | None = None) -> tuple[bytes, str]:
        """The same data key wrapped under the newest master key, and that key's id."""
        return self._wrap(case_id, self.unwrap(case_id, wrapped_key, kid)), self.master_key_id

    def token(self, case_id: uuid.UUID, wrapped_key: bytes, kid: str | None = None) -> str:
        return child_token(self.unwrap(case_id, wrapped_key, kid), case_id)

    def seal_note(self, case_id: uuid.UUID, *, wrapped_key: bytes, plaintext: bytes) -> bytes:
        """A free-text note on the case (e.g. the coordinator's override reason) under the case's
        own data key: erased with the case."""
        data_key = self.unwrap(case_id, wrapped_key)
        n = os.urandom(NONCE_BYTES)
        return n + AESGCM(data_key).encrypt(n, plaintext, self._aad(case_id, "note"))

    def open_note(self, case_id: uuid.UUID, *, ciphertext: bytes, wrapped_key: bytes) -> bytes:
        data_key = self.unwrap(case_id, wrapped_key)
        try:
            return AESGCM(data_key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                            self._aad(case_id, "note"))
        except InvalidTag:
            raise DecryptionError(f"a note of case {case_id} does not open with its key") from None

    def open(self, case_id: uuid.UUID, *, ciphertext: bytes, wrapped_key: bytes, kid: str | None = None) -> bytes:
        data_key = self.unwrap(case_id, wrapped_key, kid)
        try:
            return AESGCM(data_key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                            self._aad(case_id, "pii"))
        except InvalidTag:
            raise DecryptionError(f"the personal data of case {case_id} does not open with its key") from None
