"""Sessions, kept in this process's memory: the browser holds only a random session id in an
HttpOnly, SameSite=Lax cookie (Secure in production); the user's API token, claims, language and
CSRF token stay on the server. A restart signs everyone out; several replicas need sticky
sessions (README: Workspace).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from shared.auth import Claims

COOKIE = "clms_ws"
IDLE_S = 8 * 3600  # a session unused for a working day ends


@dataclass
class Session:
    id: str
    csrf: str
    language: str
    token: str | None = None
    claims: Claims | None = None
    expires_at: float = 0.0  # the token's expiry (epoch seconds); 0 while signed out
    last_seen: float = field(default_factory=time.monotonic)
    flash: str | None = None  # one sentence shown on the next page (e.g. "Accepted.")
    oidc_pending: object | None = None  # state, nonce and PKCE verifier of a sign-in under way

    @property
    def signed_in(self) -> bool:
        return self.token is not None and self.claims is not None and time.time() < self.expires_at


class Sessions:
    def __init__(self, *, idle_s: float = IDLE_S, max_sessions: int = 10_000):
        self._by_id: dict[str, Session] = {}
        self._language_of: dict[str, str] = {}  # a user's language, kept across sign-ins
        self.idle_s = idle_s
        self.max_sessions = max_sessions

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        s = self._by_id.get(session_id)
        if s is None:
            return None
        now = time.monotonic()
        if now - s.last_seen > self.idle_s:
            self._by_id.pop(session_id, None)
            return None
        s.last_seen = now
        return s

    def new(self, *, language: str) -> Session:
        self._expire()
        s = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), language=language)
        self._by_id[s.id] = s
        return s

    def sign_in(self, old: Session, *, token: str, claims: Claims, expires_at: float) -> Session:
        """A new session id (and CSRF token) at sign-in: a session id planted before sign-in is
        worth nothing after it."""
        self._by_id.pop(old.id, None)
        s = self.new(language=self._language_of.get(claims.sub, old.language))
        s.token, s.claims, s.expires_at = token, claims, expires_at
        return s

    def sign_out(self, s: Session) -> None:
        self._by_id.pop(s.id, None)

    def set_language(self, s: Session, language: str) -> None:
        s.language = language
        if s.claims is not None:
            self._language_of[s.claims.sub] = language

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, v in self._by_id.items() if now - v.last_seen > self.idle_s]:
            self._by_id.pop(sid, None)
        while len(self._by_id) >= self.max_sessions:  # oldest first
            oldest = min(self._by_id.values(), key=lambda v: v.last_seen)
            self._by_id.pop(oldest.id, None)

    def __len__(self) -> int:
        return len(self._by_id)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and secrets.compare_digest(str(a), str(b))
