"""Signed webhooks: HMAC-SHA256 over `<timestamp>.<body>` with WEBHOOK_SECRET.

Headers on every webhook request the service sends:
    X-CLMS-Timestamp: 1767225600            (Unix seconds when it was signed)
    X-CLMS-Signature: sha256=<hex digest>   (HMAC-SHA256(secret, b"1767225600." + raw body))

A receiver recomputes the digest over the raw body bytes it received, compares in constant
time, and rejects timestamps older than a few minutes (replay protection). Pure, stdlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

HEADER_TIMESTAMP = "X-CLMS-Timestamp"
HEADER_SIGNATURE = "X-CLMS-Signature"
DEFAULT_TOLERANCE_S = 300


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def signature(body: bytes, secret: str | bytes, timestamp: int) -> str:
    mac = hmac.new(_key(secret), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def sign(body: bytes, secret: str | bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The headers to send with `body`."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {HEADER_TIMESTAMP: str(ts), HEADER_SIGNATURE: signature(body, secret, ts)}


def verify_signature(body: bytes, headers: Mapping[str, str], secret: str | bytes, *,
                     tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True when `headers` carry a valid, fresh signature of exactly `body`."""
    lower = {k.lower(): v for k, v in headers.items()}
    ts_raw = lower.get(HEADER_TIMESTAMP.lower(), "")
    sig = lower.get(HEADER_SIGNATURE.lower(), "")
    if not ts_raw.isdigit() or not sig.startswith("sha256="):
        return False
    ts = int(ts_raw)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    return hmac.compare_digest(signature(body, secret, ts), sig)
