"""Per-case envelope encryption (AES-256-GCM, `cryptography`).

Each case gets its own random 256-bit data key. The personal data of the case (names, date of
birth, guardian contact, notes) is encrypted with it; the data key itself is stored only
wrapped (encrypted) by the master key from settings (ENCRYPTION_MASTER_KEY). Deleting the
wrapped key of one case makes that case's ciphertext unreadable for good (crypto-erasure),
including in database backups, without touching any other case.

Both layers bind the case id as associated data, so a ciphertext or a wrapped key copied onto
another case does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


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


@dataclass(frozen=True, slots=True)
class Sealed:
    ciphertext: bytes  # nonce || AES-GCM(data key, personal JSON)
    wrapped_key: bytes  # nonce || AES-GCM(master key, data key)
    master_key_id: str


class CaseCipher:
    def __init__(self, master_key: bytes):
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._master = AESGCM(master_key)
        # identifies which master key wrapped a data key (for rotation), reveals nothing of it
        self.master_key_id = hashlib.sha256(b"clms-master-key-id|" + master_key).hexdigest()[:16]

    @staticmethod
    def _aad(case_id: uuid.UUID, layer: str) -> bytes:
        return f"clms:{layer}:{case_id}".encode()

    def seal(self, case_id: uuid.UUID, plaintext: bytes) -> Sealed:
        data_key = AESGCM.generate_key(bit_length=256)
        n1, n2 = os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
        ciphertext = n1 + AESGCM(data_key).encrypt(n1, plaintext, self._aad(case_id, "pii"))
        wrapped = n2 + self._master.encrypt(n2, data_key, self._aad(case_id, "key"))
        return Sealed(ciphertext=ciphertext, wrapped_key=wrapped, master_key_id=self.master_key_id)

    def unwrap(self, case_id: uuid.UUID, wrapped_key: bytes) -> bytes:
        try:
            return self._master.decrypt(wrapped_key[:NONCE_BYTES], wrapped_key[NONCE_BYTES:],
                                        self._aad(case_id, "key"))
        except InvalidTag:
            raise DecryptionError(f"the data key of case {case_id} does not open with this master key") from None

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

    def open(self, case_id: uuid.UUID, *, ciphertext: bytes, wrapped_key: bytes) -> bytes:
        data_key = self.unwrap(case_id, wrapped_key)
        try:
            return AESGCM(data_key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                            self._aad(case_id, "pii"))
        except InvalidTag:
            raise DecryptionError(f"the personal data of case {case_id} does not open with its key") from None
