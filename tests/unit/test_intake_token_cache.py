"""Verified tokens are cached (issue 18: a signature check per request is the costliest step of
authentication), but the cache never lets a token in that a fresh check would refuse: an expired
token is refused, and so is a token whose signing key the issuer has withdrawn (revoked), although
both were verified and cached before.

A real local issuer (tests.unit.test_hardening.Issuer, a uvicorn server) publishes the key set.
Intake's guard and its routes ask the same `Verifier` (shared.guard.harden)."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from shared.auth import TokenError, Verifier
from shared.settings import Settings
from tests.unit.test_hardening import PROD, issuer  # noqa: F401 - the local issuer fixture

DEV = dict(JWT_SECRET="x" * 40, CHILD_REF_KEY="y" * 40, IDEMPOTENCY_HMAC_KEY="w" * 40,
           ENCRYPTION_MASTER_KEY="QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", CLMS_ENV="test")


def settings(**env) -> Settings:
    return Settings(_env_file=None, **env)  # type: ignore[call-arg]


def short_lived(s: Settings, *, ttl_s: int) -> tuple[str, int]:
    now = int(time.time())
    exp = now + ttl_s
    token = jwt.encode({"sub": "police.prizren.duty", "agency": "police", "municipality": "prizren",
                        "roles": ["reporter"], "iss": s.jwt_issuer, "aud": s.jwt_audiences, "iat": now,
                        "exp": exp}, s.jwt_secret.get_secret_value(), algorithm="HS256")
    return token, exp


async def until_past(moment: float) -> None:
    while time.time() <= moment:
        await asyncio.sleep(moment - time.time() + 0.05)


async def test_a_cached_token_is_refused_once_it_has_expired():
    s = settings(**DEV)
    verifier = Verifier(s, service="intake")
    token, exp = short_lived(s, ttl_s=2)
    first = await verifier.verified(token)
    assert await verifier.verified(token) is first, "a verified token is served from the cache"
    await until_past(exp)
    with pytest.raises(TokenError, match="expired"):
        await verifier.verified(token)


async def test_a_cached_token_is_refused_once_the_issuer_withdraws_its_signing_key(issuer):  # noqa: F811
    s = settings(**PROD, OIDC_JWKS_URL=f"{issuer.url}/jwks", JWT_ISSUER=issuer.url, JWKS_REFRESH_S=0.2,
                 JWKS_MIN_REFRESH_S=60)
    verifier = Verifier(s, service="referral")
    issuer.published = ["k1"]
    token = issuer.token("k1", s)
    try:
        first = await verifier.verified(token)
        assert await verifier.verified(token) is first, "a verified token is served from the cache"
        issuer.token("k3", s)
        issuer.published = ["k3"]  # k1 withdrawn (compromised): its tokens are revoked
        deadline = time.monotonic() + 10
        while True:  # the key set is refreshed in the background every JWKS_REFRESH_S
            try:
                await verifier.verified(token)
            except TokenError as exc:
                assert "unknown signing key" in str(exc)
                break
            assert time.monotonic() < deadline, "a token signed by a withdrawn key is still accepted"
            await asyncio.sleep(0.1)
    finally:
        issuer.published = ["k1"]
        await verifier.aclose()
