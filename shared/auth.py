"""Authentication: `Authorization: Bearer <JWT>` into a `Claims` model.

Development and tests: HS256 tokens signed with JWT_SECRET (at least 32 bytes; `clms token ...`
mints them, for all four audiences). Production (CLMS_ENV=production): OIDC_JWKS_URL is required,
only asymmetric algorithms are accepted, and `clms token` refuses to run. Every service requires
its own audience (`Settings.jwt_audience_for`) and a lifetime (exp - iat) of at most
MAX_TOKEN_LIFETIME_S. The issuer's keys are fetched asynchronously (`JwksCache`); verified tokens
are remembered by hash (TOKEN_CACHE_SIZE, least recently used first out) until they expire or the
issuer withdraws the key that signed them. No token: 401. A token for the wrong agency, municipality or role: 403 (the services decide).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

import cachetools
import httpx
import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.events import AgencyType
from shared.reference import municipality_slugs
from shared.settings import Environment, Settings

log = logging.getLogger("clms.auth")


class Role:
    reporter = "reporter"  # may create identifications
    caseworker = "caseworker"  # acts on referrals and records case outcomes
    duty_officer = "duty_officer"
    supervisor = "supervisor"
    coordinator = "coordinator"
    analyst = "analyst"
    public = "public"
    operator = "operator"


class Claims(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    sub: str = Field(min_length=1, max_length=200)
    agency: AgencyType
    municipality: str
    roles: tuple[str, ...] = ()

    @field_validator("municipality")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "*" and v not in municipality_slugs():
            raise ValueError(f"unknown municipality {v!r}")
        return v

    def has_role(self, *roles: str) -> bool:
        """Whether the token holds one of `roles` that its agency may hold (shared/access_policy.yaml:
        a labour-inspectorate token with role `coordinator` does not hold it)."""
        from shared.access import policy

        held = policy().effective_roles(self)
        return any(r in held for r in roles)

    @property
    def is_coordinator(self) -> bool:
        return self.has_role(Role.coordinator)

    def coordinates(self, municipality: str) -> bool:
        return self.is_coordinator and self.municipality in (municipality, "*")


class TokenError(Exception):
    pass


class DevelopmentTokensRefused(RuntimeError):
    pass


def mint_token(settings: Settings, *, sub: str, agency: str, municipality: str,
               roles: list[str] | tuple[str, ...], ttl_s: int = 12 * 3600) -> str:
    """A development token (HS256, JWT_SECRET) for all four services' audiences. Refused with
    CLMS_ENV=production, where tokens come from the OIDC issuer."""
    if settings.environment is Environment.production:
        raise DevelopmentTokensRefused(
            "development tokens are refused with CLMS_ENV=production: tokens come from the OIDC issuer "
            "(OIDC_JWKS_URL); mint development tokens only in development or tests")
    claims = Claims(sub=sub, agency=agency, municipality=municipality, roles=tuple(roles))
    now = int(time.time())
    payload = {
        "sub": claims.sub,
        "agency": claims.agency.value,
        "municipality": claims.municipality,
        "roles": list(claims.roles),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audiences,
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(payload, settings.jwt_secret.get_secret_value(), algorithm="HS256")


ASYMMETRIC = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
MIN_HS256_SECRET_BYTES = 32


class JwksCache:
    """The issuer's signing keys, fetched with httpx.AsyncClient (never blocking the event loop),
    refreshed in the background every `refresh_s`; a token naming an unknown `kid` triggers at most
    one fetch per `min_interval_s` (so a flood of forged kids cannot hammer the issuer)."""

    def __init__(self, url: str, *, refresh_s: float = 300.0, min_interval_s: float = 30.0,
                 client: httpx.AsyncClient | None = None):
        self.url = url
        self.refresh_s = refresh_s
        self.min_interval_s = min_interval_s
        self._client = client
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = float("-inf")  # monotonic time of the last fetch attempt
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self.fetches = 0

    async def _fetch(self) -> None:
        self._last_fetch = time.monotonic()
        self.fetches += 1
        client = self._client or httpx.AsyncClient(timeout=5.0)
        try:
            r = await client.get(self.url, headers={"Accept": "application/json"})
            r.raise_for_status()
            keys = {}
            for data in r.json().get("keys", []):
                if data.get("use", "sig") != "sig":
                    continue
                try:
                    key = jwt.PyJWK(data)
                except jwt.PyJWTError:
                    continue  # a key type this library does not know: skip it, keep the others
                keys[data.get("kid", "")] = key
            self._keys = keys
        finally:
            if self._client is None:
                await client.aclose()

    async def _refresh(self, *, only_if_older_than: float) -> None:
        async with self._lock:  # one fetch at a time; waiters use its result
            if time.monotonic() - self._last_fetch < only_if_older_than:
                return
            await self._fetch()

    def _ensure_background(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._background(), name="jwks-refresh")

    async def _background(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._refresh(only_if_older_than=0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - issuer away: keep the keys we have
                log.warning("JWKS refresh from the issuer failed (%s); keeping the cached keys", type(exc).__name__)

    async def key(self, kid: str) -> jwt.PyJWK:
        self._ensure_background()
        if kid not in self._keys:
            try:
                await self._refresh(only_if_older_than=self.min_interval_s)
            except Exception as exc:  # noqa: BLE001
                log.warning("JWKS fetch from the issuer failed (%s)", type(exc).__name__)
        found = self._keys.get(kid)
        if found is None:
            raise TokenError(f"invalid token: unknown signing key id {kid[:40]!r}")
        return found

    def has(self, kid: str) -> bool:
        """Whether the issuer's key set, as last fetched, still holds `kid`."""
        return kid in self._keys

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


@dataclass(frozen=True, slots=True)
class Verified:
    claims: Claims
    exp: float  # Unix seconds
    iat: float
    kid: str | None = None  # the issuer's signing key that verified it (None: HS256 development token)


class Verifier:
    """Checks bearer tokens for one service (its audience) or, with `service=None`, for any of
    the four APIs (the workspace, which forwards tokens to them).

    Production (CLMS_ENV=production) needs OIDC_JWKS_URL and accepts only asymmetric algorithms;
    HS256 with JWT_SECRET (at least 32 bytes) is for development and tests only."""

    def __init__(self, settings: Settings, *, service: str | None = None,
                 http: httpx.AsyncClient | None = None):
        self.settings = settings
        self.refuse_hs256 = settings.environment is Environment.production and not settings.oidc_jwks_url
        if self.refuse_hs256 and service is not None:
            raise RuntimeError(
                "CLMS_ENV=production needs OIDC_JWKS_URL (the OpenID Connect issuer's key set): HS256 "
                "development tokens signed with JWT_SECRET are refused in production")
        if not settings.oidc_jwks_url and len(settings.jwt_secret.get_secret_value().encode()) < MIN_HS256_SECRET_BYTES:
            raise RuntimeError(
                f"JWT_SECRET must hold at least {MIN_HS256_SECRET_BYTES} random bytes for HS256 development "
                "tokens; generate one with `python -c 'import secrets; print(secrets.token_urlsafe(48))'`")
        self.audience: str | list[str] = (settings.jwt_audience_for(service) if service
                                          else settings.jwt_audiences)
        self.jwks = (JwksCache(settings.oidc_jwks_url, refresh_s=settings.jwks_refresh_s,
                               min_interval_s=settings.jwks_min_refresh_s, client=http)
                     if settings.oidc_jwks_url else None)
        self._cache: cachetools.TLRUCache | None = (
            cachetools.TLRUCache(maxsize=settings.token_cache_size, ttu=lambda _k, v, _now: v.exp, timer=time.time)
            if settings.token_cache_size else None)

    def _decode(self, token: str, key: Any, algorithms: list[str], *, kid: str | None = None) -> Verified:
        try:
            payload = jwt.decode(
                token, key, algorithms=algorithms,
                audience=self.audience, issuer=self.settings.jwt_issuer,
                options={"require": ["sub", "exp", "iat", "aud"]},
            )
        except jwt.InvalidAudienceError:
            raise TokenError(f"invalid token: its audience (aud) is not this service's ({self.audience}); "
                             "ask the issuer for a token for this service") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        lifetime = float(payload["exp"]) - float(payload["iat"])
        if lifetime > self.settings.max_token_lifetime_s:
            raise TokenError(
                f"invalid token: its lifetime ({lifetime:.0f} s from iat to exp) is longer than "
                f"MAX_TOKEN_LIFETIME_S ({self.settings.max_token_lifetime_s} s); ask the issuer for a shorter-lived token")
        try:
            claims = Claims.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise TokenError(f"invalid token claim {field}: {first['msg']}") from None
        return Verified(claims=claims, exp=float(payload["exp"]), iat=float(payload["iat"]), kid=kid)

    def _cached(self, token: str) -> tuple[str, Verified | None]:
        """A token verified before, while it has not expired and the key that signed it is still
        in the issuer's key set (a key the issuer withdrew revokes its cached tokens too)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest) if self._cache is not None else None
        if hit is None or hit.exp <= time.time():
            return digest, None
        if hit.kid is not None and (self.jwks is None or not self.jwks.has(hit.kid)):
            self._cache.pop(digest, None)  # type: ignore[union-attr]
            return digest, None
        return digest, hit

    def _header(self, token: str) -> dict:
        try:
            return jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None

    async def verified(self, token: str) -> Verified:
        """Verify `token` (fetching the issuer's keys without blocking when a `kid` is new)."""
        digest, hit = self._cached(token)
        if hit is not None:
            return hit
        if self.jwks is not None:
            header = self._header(token)
            if header.get("alg") not in ASYMMETRIC:
                raise TokenError(f"invalid token: algorithm {header.get('alg')!r} is not accepted; "
                                 "tokens must be signed by the OIDC issuer with an asymmetric key")
            kid = str(header.get("kid", ""))
            jwk = await self.jwks.key(kid)
            out = self._decode(token, jwk.key, ASYMMETRIC, kid=kid)
        else:
            self._no_hs256_in_production()
            out = self._decode(token, self.settings.jwt_secret.get_secret_value(), ["HS256"])
        if self._cache is not None:
            self._cache[digest] = out
        return out

    def verify(self, token: str) -> Claims:
        """Synchronous check for HS256 development tokens (and issuer keys already cached)."""
        digest, hit = self._cached(token)
        if hit is not None:
            return hit.claims
        if self.jwks is not None:
            header = self._header(token)
            jwk = self.jwks._keys.get(str(header.get("kid", "")))
            if jwk is None or header.get("alg") not in ASYMMETRIC:
                raise TokenError("invalid token: signing key not loaded; use `await Verifier.verified()`")
            return self._decode(token, jwk.key, ASYMMETRIC).claims
        self._no_hs256_in_production()
        return self._decode(token, self.settings.jwt_secret.get_secret_value(), ["HS256"]).claims

    def _no_hs256_in_production(self) -> None:
        if self.refuse_hs256:
            raise TokenError("invalid token: HS256 development tokens are refused with CLMS_ENV=production; "
                             "set OIDC_JWKS_URL and use the OIDC issuer's tokens")

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()


_bearer = HTTPBearer(auto_error=False)


def _verifier(request: Request) -> Verifier:
    return request.app.state.verifier


async def authenticate(request: Request, token: str) -> Verified:
    """Verify a bearer token for this service: 401 with the reason, 429 after too many failed
    attempts from one address (`shared.guard`). Remembers the expiry on `request.state`."""
    guard = getattr(request.app.state, "guard", None)
    address = request.client.host if request.client else "unknown"
    if guard is not None:
        await guard.check_auth_failures(address)
    try:
        verified = await _verifier(request).verified(token)
    except TokenError as exc:
        if guard is not None:
            await guard.record_auth_failure(address)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc),
                            headers={"WWW-Authenticate": "Bearer"}) from None
    request.state.token_exp = verified.exp
    return verified


MISSING_TOKEN = ("missing bearer token: send Authorization: Bearer <JWT> "
                 "(`clms token` mints one for development)")


async def current_claims(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Claims:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, MISSING_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return (await authenticate(request, credentials.credentials)).claims


async def optional_claims(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Claims | None:
    if credentials is None:
        return None
    return await current_claims(request, credentials)


CurrentClaims = Annotated[Claims, Depends(current_claims)]
OptionalClaims = Annotated[Claims | None, Depends(optional_claims)]


def forbid(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)
