"""Signed webhooks that cannot be replayed: HMAC-SHA256 with WEBHOOK_SECRET over
`<id>.<timestamp>.<body>`.

Headers on every webhook request the service sends:
    X-CLMS-Webhook-Id: 6f1c...                 (a new random id for every request)
    X-CLMS-Timestamp: 1767225600               (Unix seconds when it was signed)
    X-CLMS-Signature: sha256=<hex digest>      (HMAC-SHA256(secret, b"<id>.1767225600." + raw body))

A receiver recomputes the digest over the id, the timestamp and the raw body bytes it received,
compares in constant time, refuses a timestamp more than DEFAULT_TOLERANCE_S from its clock, and
refuses an id it has already accepted within that window (`ReplayGuard`): a captured request
sent again is refused, whether its timestamp is still fresh or not. Pure, stdlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping

HEADER_ID = "X-CLMS-Webhook-Id"
HEADER_TIMESTAMP = "X-CLMS-Timestamp"
HEADER_SIGNATURE = "X-CLMS-Signature"
DEFAULT_TOLERANCE_S = 300
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def signature(body: bytes, secret: str | bytes, timestamp: int, webhook_id: str) -> str:
    mac = hmac.new(_key(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def sign(body: bytes, secret: str | bytes, *, timestamp: int | None = None,
         webhook_id: str | None = None) -> dict[str, str]:
    """The headers to send with `body` (a new id each call)."""
    ts = int(time.time()) if timestamp is None else timestamp
    wid = webhook_id or secrets.token_urlsafe(18)
    return {HEADER_ID: wid, HEADER_TIMESTAMP: str(ts), HEADER_SIGNATURE: signature(body, secret, ts, wid)}


def check(body: bytes, headers: Mapping[str, str], secret: str | bytes, *,
          tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None) -> str | None:
    """None when `headers` carry a valid, fresh signature of exactly `body`; else why not."""
    lower = {k.lower(): v for k, v in headers.items()}
    wid = lower.get(HEADER_ID.lower(), "")
    ts_raw = lower.get(HEADER_TIMESTAMP.lower(), "")
    sig = lower.get(HEADER_SIGNATURE.lower(), "")
    if not (8 <= len(wid) <= 100) or not set(wid) <= _ID_CHARS:
        return f"{HEADER_ID} is missing or malformed"
    if not ts_raw.isdigit() or not sig.startswith("sha256="):
        return f"{HEADER_TIMESTAMP} or {HEADER_SIGNATURE} is missing or malformed"
    ts = int(ts_raw)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return f"the timestamp is more than {tolerance_s} s from the receiver's clock"
    if not hmac.compare_digest(signature(body, secret, ts, wid), sig):
        return "the signature does not verify"
    return None


def verify_signature(body: bytes, headers: Mapping[str, str], secret: str | bytes, *,
                     tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True when `headers` carry a valid, fresh signature of exactly `body` (ids not remembered:
    use `ReplayGuard.accept` in a receiver)."""
    return check(body, headers, secret, tolerance_s=tolerance_s, now=now) is None


class ReplayGuard:
    """A receiver's memory of the ids it accepted, each kept for the signature window (a request
    older than the window is refused by its timestamp anyway). One process: a receiver with
    several replicas keeps the ids in a store they share (e.g. Redis SET NX with an expiry)."""

    def __init__(self, secret: str | bytes, *, tolerance_s: int = DEFAULT_TOLERANCE_S, max_ids: int = 100_000):
        self.secret = secret
        self.tolerance_s = tolerance_s
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> when it may be forgotten

    def accept(self, body: bytes, headers: Mapping[str, str], *, now: float | None = None) -> str | None:
        """None when the request is authentic, fresh and new (its id is then remembered); else why not."""
        current = time.time() if now is None else now
        why = check(body, headers, self.secret, tolerance_s=self.tolerance_s, now=current)
        if why:
            return why
        while self._seen and next(iter(self._seen.values())) < current:
            self._seen.popitem(last=False)
        wid = {k.lower(): v for k, v in headers.items()}[HEADER_ID.lower()]
        if wid in self._seen:
            return f"webhook id {wid} was already received: a replayed request is refused"
        if len(self._seen) >= self.max_ids:
            return "too many webhooks within the signature window; retry later"
        self._seen[wid] = current + 2 * self.tolerance_s
        return None
