"""Authentication: `Authorization: Bearer <JWT>` into a `Claims` model.

Development: HS256 tokens signed with JWT_SECRET (`clms token ...` mints them).
Production: set OIDC_JWKS_URL and tokens are verified against the issuer's JWKS (RS256/ES256).
No token: 401. A token for the wrong agency, municipality or role: 403 (the services decide).
"""

from __future__ import annotations

import time
from typing import Annotated

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.events import AgencyType
from shared.reference import municipality_slugs
from shared.settings import Settings


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


def mint_token(settings: Settings, *, sub: str, agency: str, municipality: str,
               roles: list[str] | tuple[str, ...], ttl_s: int = 12 * 3600) -> str:
    """A development token (HS256, JWT_SECRET). Production tokens come from the OIDC issuer."""
    claims = Claims(sub=sub, agency=agency, municipality=municipality, roles=tuple(roles))
    now = int(time.time())
    payload = {
        "sub": claims.sub,
        "agency": claims.agency.value,
        "municipality": claims.municipality,
        "roles": list(claims.roles),
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(payload, settings.jwt_secret.get_secret_value(), algorithm="HS256")


class Verifier:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._jwks = jwt.PyJWKClient(settings.oidc_jwks_url) if settings.oidc_jwks_url else None

    def verify(self, token: str) -> Claims:
        try:
            if self._jwks is not None:
                key = self._jwks.get_signing_key_from_jwt(token).key
                algorithms = ["RS256", "ES256", "PS256"]
            else:
                key = self.settings.jwt_secret.get_secret_value()
                algorithms = ["HS256"]
            payload = jwt.decode(
                token, key, algorithms=algorithms,
                audience=self.settings.jwt_audience, issuer=self.settings.jwt_issuer,
                options={"require": ["sub", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        try:
            return Claims.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise TokenError(f"invalid token claim {field}: {first['msg']}") from None


_bearer = HTTPBearer(auto_error=False)


def _verifier(request: Request) -> Verifier:
    return request.app.state.verifier


def current_claims(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Claims:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send Authorization: Bearer <JWT> (`clms token` mints one for development)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        return _verifier(request).verify(credentials.credentials)
    except TokenError as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc),
                            headers={"WWW-Authenticate": "Bearer"}) from None


def optional_claims(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Claims | None:
    if credentials is None:
        return None
    return current_claims(request, credentials)


CurrentClaims = Annotated[Claims, Depends(current_claims)]
OptionalClaims = Annotated[Claims | None, Depends(optional_claims)]


def forbid(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)
