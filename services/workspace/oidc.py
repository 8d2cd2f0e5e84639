"""Production sign-in: OpenID Connect authorization code flow with PKCE (S256), with authlib.

1. `start`: read the issuer's discovery document, make a state, a nonce and a code verifier
   (kept in the server-side session, never in a cookie or a URL of ours), redirect the browser to
   the issuer's authorization endpoint with the S256 code challenge.
2. `finish`: the issuer redirects back to `/signin/callback?code=&state=`; the state must be the
   session's; the code is exchanged at the token endpoint with the code verifier (and the client
   secret when the client has one).
3. The access token is what the workspace sends to the APIs; it is verified exactly as the
   services verify it (`shared.auth.Verifier`: the issuer's JWKS at OIDC_JWKS_URL, JWT_ISSUER,
   JWT_AUDIENCE, the claims `sub`, `agency`, `municipality`, `roles`). A token the services would
   refuse is refused here, with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client

from shared.auth import Claims, TokenError, Verifier
from shared.settings import Settings


class SignInFailed(Exception):
    """A sentence for the person signing in (and the log)."""


@dataclass(frozen=True)
class Pending:
    """What the session keeps between the redirect to the issuer and the way back."""

    state: str
    nonce: str
    code_verifier: str
    next_path: str


@dataclass(frozen=True)
class SignedIn:
    token: str
    claims: Claims
    expires_at: float


def enabled(settings: Settings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def redirect_uri(settings: Settings) -> str:
    return f"{settings.workspace_url}/signin/callback"


def _client(settings: Settings) -> AsyncOAuth2Client:
    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
    return AsyncOAuth2Client(
        client_id=settings.oidc_client_id, client_secret=secret,
        token_endpoint_auth_method="client_secret_post" if secret else "none",
        scope=settings.oidc_scope, redirect_uri=redirect_uri(settings), code_challenge_method="S256",
        timeout=10.0,
    )


async def discover(http: httpx.AsyncClient, *, settings: Settings) -> dict[str, Any]:
    issuer = (settings.oidc_issuer or "").rstrip("/")
    try:
        r = await http.get(f"{issuer}/.well-known/openid-configuration", timeout=10.0)
        r.raise_for_status()
        doc = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise SignInFailed(f"the identity provider {issuer} did not answer ({type(exc).__name__}); "
                           "try again shortly") from None
    for key in ("authorization_endpoint", "token_endpoint"):
        if not doc.get(key):
            raise SignInFailed(f"the identity provider's discovery document has no {key}")
    return doc


async def start(http: httpx.AsyncClient, *, settings: Settings, next_path: str) -> tuple[str, Pending]:
    """The issuer's authorization URL to send the browser to, and what to keep in the session."""
    doc = await discover(http, settings=settings)
    pending = Pending(state=generate_token(32), nonce=generate_token(32), code_verifier=generate_token(64),
                      next_path=next_path)
    async with _client(settings) as client:
        url, _ = client.create_authorization_url(doc["authorization_endpoint"], state=pending.state,
                                                 code_verifier=pending.code_verifier, nonce=pending.nonce)
    return url, pending


async def finish(http: httpx.AsyncClient, *, settings: Settings, verifier: Verifier, pending: Pending | None,
                 state: str | None, code: str | None, error: str | None = None) -> SignedIn:
    """Exchange the code (with the PKCE verifier) and verify the access token as the services do."""
    import secrets

    if error:
        raise SignInFailed(f"the identity provider refused the sign-in ({error})")
    if pending is None or not state or not secrets.compare_digest(state, pending.state):
        raise SignInFailed("this sign-in did not start here or has expired; start again")
    if not code:
        raise SignInFailed("the identity provider sent no authorization code; start again")
    doc = await discover(http, settings=settings)
    try:
        async with _client(settings) as client:
            token = await client.fetch_token(doc["token_endpoint"], code=code,
                                             code_verifier=pending.code_verifier,
                                             grant_type="authorization_code")
    except Exception as exc:  # noqa: BLE001 - authlib raises OAuthError and httpx errors
        raise SignInFailed(f"the identity provider did not accept the sign-in ({exc})") from None
    access = token.get("access_token")
    if not access:
        raise SignInFailed("the identity provider returned no access token")
    try:
        claims = (await verifier.verified(access)).claims  # the issuer's keys are fetched without blocking
    except TokenError as exc:
        raise SignInFailed(f"the services would refuse this account's token: {exc}") from None
    expires_in = token.get("expires_in")
    expires_at = float(token.get("expires_at") or (time.time() + float(expires_in or 3600)))
    return SignedIn(token=access, claims=claims, expires_at=expires_at - 30)
