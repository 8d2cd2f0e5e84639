"""Issue 16, items 3, 4, 7 and 8 where no broker or database is needed: production tokens,
audiences and lifetimes, the issuer's key set fetched at most once per interval for unknown key
ids (a real local JWKS server), `clms token` in production, tokens in URLs, body limits before
reading, authentication before the body, rate limits, /docs in production, /readyz wording.

The services' apps are driven at the ASGI level (their lifespans are not started: everything
tested here happens before a route runs)."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from shared.auth import Claims, DevelopmentTokensRefused, TokenError, Verifier, mint_token
from shared.embedded import free_port
from shared.settings import Settings
from shared.web import ops_router
from tests.apps import served_in_thread

PROD = dict(CLMS_ENV="production", JWT_SECRET="x" * 40, CHILD_REF_KEY="y" * 40,
            ENCRYPTION_MASTER_KEY="QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", WEBHOOK_SECRET="z" * 40,
            IDEMPOTENCY_HMAC_KEY="w" * 40)
PERSON = dict(sub="police.prizren.duty", agency="police", municipality="prizren", roles=["reporter"])


def settings(**env) -> Settings:
    return Settings(_env_file=None, **env)  # type: ignore[call-arg]


def hs256(s: Settings, **claims) -> str:
    now = int(time.time())
    body = {"sub": "police.prizren.duty", "agency": "police", "municipality": "prizren", "roles": ["reporter"],
            "iss": s.jwt_issuer, "aud": s.jwt_audiences, "iat": now, "exp": now + 600, **claims}
    return jwt.encode(body, s.jwt_secret.get_secret_value(), algorithm="HS256")


# --- item 3: production tokens ------------------------------------------------------------------


async def test_production_refuses_hs256_tokens():
    with pytest.raises(RuntimeError, match="CLMS_ENV=production needs OIDC_JWKS_URL"):
        Verifier(settings(**PROD), service="intake")
    prod = settings(**PROD, OIDC_JWKS_URL="http://127.0.0.1:9/jwks")
    dev_token = hs256(settings(), iss=prod.jwt_issuer, aud=prod.jwt_audiences)
    dev_token = jwt.encode(jwt.decode(dev_token, options={"verify_signature": False}),
                           prod.jwt_secret.get_secret_value(), algorithm="HS256")
    with pytest.raises(TokenError, match="HS256"):
        await Verifier(prod, service="intake").verified(dev_token)
    with pytest.raises(DevelopmentTokensRefused, match="refused with CLMS_ENV=production"):
        mint_token(prod, **PERSON)


def test_hs256_needs_32_bytes_of_secret():
    with pytest.raises(RuntimeError, match="at least 32 random bytes"):
        Verifier(settings(JWT_SECRET="short-secret"), service="intake")


async def test_each_service_requires_its_own_audience():
    s = settings()
    intake = Verifier(s, service="intake")
    assert (await intake.verified(hs256(s, aud="clms-intake"))).claims.sub == "police.prizren.duty"
    for other in ("clms-referral", "clms", ["clms-analytics", "clms-notifications"]):
        with pytest.raises(TokenError, match="audience .aud. is not this service's"):
            await intake.verified(hs256(s, aud=other))
    # development tokens carry all four audiences
    token = mint_token(s, **PERSON)
    for service in ("intake", "referral", "notifications", "analytics"):
        assert Verifier(s, service=service).verify(token).agency == "police"
    assert settings(INTAKE_JWT_AUDIENCE="api://intake").jwt_audience_for("intake") == "api://intake"


async def test_a_token_living_longer_than_the_maximum_is_refused():
    s = settings(MAX_TOKEN_LIFETIME_S=3600)
    now = int(time.time())
    verifier = Verifier(s, service="intake")
    with pytest.raises(TokenError, match="MAX_TOKEN_LIFETIME_S"):
        await verifier.verified(hs256(s, iat=now, exp=now + 3601))
    with pytest.raises(TokenError, match="iat"):
        await verifier.verified(hs256(s, iat=None) if False else jwt.encode(
            {k: v for k, v in jwt.decode(hs256(s), options={"verify_signature": False}).items() if k != "iat"},
            s.jwt_secret.get_secret_value(), algorithm="HS256"))
    assert (await verifier.verified(hs256(s, iat=now, exp=now + 3600))).claims.municipality == "prizren"


def test_clms_token_refuses_to_run_in_production(monkeypatch):
    from clms.cli import app

    for key, value in {**PROD, "OIDC_JWKS_URL": "https://idp.example/jwks"}.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["token", "--agency", "police", "--municipality", "prizren",
                                      "--role", "reporter"])
    assert result.exit_code != 0
    assert "refuses to run with CLMS_ENV=production" in result.output
    assert "eyJ" not in result.output  # no token printed


class Issuer:
    """A local OpenID issuer's key set that counts how often it is fetched."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.published = ["k1"]
        self.fetches = 0
        app = FastAPI()

        @app.get("/jwks")
        async def jwks() -> dict:
            self.fetches += 1
            out = []
            for kid in self.published:
                jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
                out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
            return {"keys": out}

        self.app = app

    def token(self, kid: str, settings: Settings, *, key=None) -> str:
        key = key or self.keys.setdefault(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        now = int(time.time())
        return jwt.encode({"sub": "csw.prizren.duty", "agency": "csw", "municipality": "prizren",
                           "roles": ["caseworker"], "iss": self.url, "aud": settings.jwt_audiences,
                           "iat": now, "exp": now + 300}, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer():
    i = Issuer()
    with served_in_thread(i.app, port=i.port, what="the local issuer"):
        yield i


async def test_unknown_key_ids_refresh_the_key_set_at_most_once_per_interval(issuer):
    s = settings(**PROD, OIDC_JWKS_URL=f"{issuer.url}/jwks", JWT_ISSUER=issuer.url, JWKS_MIN_REFRESH_S=1.0)
    verifier = Verifier(s, service="referral")
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = [issuer.token(f"forged-{n}", s, key=attacker) for n in range(10)]
    issuer.token("k2", s)  # the issuer's next key, not published yet
    try:
        before = issuer.fetches
        assert (await verifier.verified(issuer.token("k1", s))).claims.sub == "csw.prizren.duty"
        assert issuer.fetches == before + 1
        results = await asyncio.gather(*(verifier.verified(t) for t in forged), return_exceptions=True)
        assert all(isinstance(r, TokenError) and "unknown signing key" in str(r) for r in results)
        assert issuer.fetches == before + 1, "unknown kids within the interval must not fetch the key set again"
        # the issuer rotates to k2: once the interval has passed, one fetch finds the new key
        issuer.published = ["k1", "k2"]
        rotated = issuer.token("k2", s)
        await asyncio.sleep(1.05)
        assert (await verifier.verified(rotated)).claims.agency == "csw"
        assert issuer.fetches == before + 2
        for t in forged:
            with pytest.raises(TokenError):
                await verifier.verified(t)
        assert issuer.fetches == before + 2
        # an HS256 token signed with the development secret is refused in production
        with pytest.raises(TokenError, match="HS256"):
            await verifier.verified(jwt.encode({"sub": "x", "kid": "k1"}, "x" * 40, algorithm="HS256"))
    finally:
        await verifier.aclose()


# --- items 4, 7, 8: the request guard on the services' apps ----------------------------------------


def service_app(name: str, s: Settings) -> FastAPI:
    if name == "intake":
        from services.intake.app import create_app
    elif name == "referral":
        from services.referral.app import create_app
    elif name == "notifications":
        from services.notifications.app import create_app
    else:
        from services.analytics.app import create_app
    return create_app(s)


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("name, path", [
    ("analytics", "/v1/stream?access_token={t}"), ("analytics", "/?token={t}"),
    ("notifications", "/v1/inbox/stream?access_token={t}"), ("notifications", "/v1/inbox?token={t}"),
    ("intake", "/v1/cases/00000000-0000-0000-0000-000000000000?access_token={t}"),
    ("referral", "/v1/referrals?jwt={t}"),
])
async def test_a_token_in_the_query_string_is_refused(name, path):
    s = settings()
    token = mint_token(s, **PERSON)
    async with client(service_app(name, s)) as http:
        r = await http.get(path.format(t=token))
    assert r.status_code == 400
    assert "a token in the URL is refused" in r.json()["detail"] and "Authorization: Bearer" in r.json()["detail"]


class Body:
    """An ASGI request body that records how much of it the app read."""

    def __init__(self, size: int, chunk: int = 64 * 1024):
        self.left, self.chunk, self.read = size, chunk, 0

    async def receive(self) -> dict:
        n = min(self.chunk, self.left)
        self.left -= n
        self.read += n
        return {"type": "http.request", "body": b"x" * n, "more_body": self.left > 0}


async def call(app: FastAPI, *, method: str, path: str, headers: dict[str, str], body: Body) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("198.51.100.7", 40000), "server": ("test", 80), "state": {}}
    try:
        await app(scope, body.receive, send)
    except Exception:  # noqa: BLE001 - a route past the guard without its lifespan's state
        return 500, b"route ran"
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_a_2_mib_body_is_refused_before_it_is_read_and_before_the_token_is_checked():
    s = settings()
    app = service_app("intake", s)
    two_mib = 2 * 1024 * 1024
    # Content-Length says it: 413 at once, no token looked at, not one byte read
    body = Body(two_mib)
    status, text = await call(app, method="POST", path="/v1/identifications", body=body,
                              headers={"content-length": str(two_mib), "content-type": "application/json"})
    assert status == 413 and b"64 KiB" in text and body.read == 0
    # the same with a forged token: still 413 without a token check (no failed sign-in counted)
    body = Body(two_mib)
    status, _ = await call(app, method="POST", path="/v1/identifications", body=body,
                           headers={"content-length": str(two_mib), "authorization": "Bearer forged"})
    assert status == 413 and body.read == 0
    # chunked (no Content-Length) and no token: 401 before a byte is read
    body = Body(two_mib)
    status, text = await call(app, method="POST", path="/v1/identifications", body=body, headers={})
    assert status == 401 and b"missing bearer token" in text and body.read == 0
    # chunked with a valid token: refused as soon as the limit is passed, not read to the end
    body = Body(two_mib)
    status, text = await call(app, method="POST", path="/v1/identifications", body=body,
                              headers={"authorization": f"Bearer {mint_token(s, **PERSON)}",
                                       "content-type": "application/json"})
    assert status == 413 and body.read <= s.identification_body_limit + 64 * 1024


@pytest.mark.parametrize("name, path", [
    ("referral", f"/v1/referrals/{uuid.uuid4()}/accept"), ("notifications", f"/v1/inbox/{uuid.uuid4()}/ack"),
    ("intake", f"/v1/cases/{uuid.uuid4()}/events"),
])
async def test_other_routes_have_a_general_body_limit(name, path):
    s = settings()
    body = Body(100 * 1024)
    status, _ = await call(service_app(name, s), method="POST", path=path, body=body,
                           headers={"content-length": str(100 * 1024)})
    assert status == 413 and body.read == 0


async def test_thirty_bad_tokens_in_a_row_are_slowed_down_with_429():
    s = settings()
    async with client(service_app("intake", s)) as http:
        answers = []
        for n in range(30):
            r = await http.post("/v1/identifications", json={}, headers={"Authorization": f"Bearer bad{n}"})
            answers.append(r)
    codes = [r.status_code for r in answers]
    assert codes[0] == 401 and codes[-1] == 429, codes
    first = codes.index(429)
    assert first <= 20 and all(c == 429 for c in codes[first:])
    limited = answers[-1]
    assert int(limited.headers["Retry-After"]) >= 1 and "too many failed sign-ins" in limited.json()["detail"]


async def test_writes_are_rate_limited_per_principal():
    s = settings(WRITE_RATE_LIMIT_PRINCIPAL="3/minute")
    token = mint_token(s, **PERSON)
    other = mint_token(s, **{**PERSON, "sub": "police.prizren.supervisor"})
    app = service_app("referral", s)
    async with client(app) as http:
        path = f"/v1/referrals/{uuid.uuid4()}/acknowledge"
        codes = []
        for _ in range(4):
            status, _ = await call(app, method="POST", path=path, body=Body(0),
                                   headers={"authorization": f"Bearer {token}", "content-length": "0"})
            codes.append(status)
        assert codes[:3] != [429] * 3 and codes[3] == 429
        status, _ = await call(app, method="POST", path=path, body=Body(0),
                               headers={"authorization": f"Bearer {other}", "content-length": "0"})
        assert status != 429  # another principal is not slowed down
    del http


@pytest.mark.parametrize("name", ["intake", "referral", "notifications", "analytics"])
async def test_docs_are_off_in_production(name):
    prod = settings(**PROD, OIDC_JWKS_URL="https://idp.example/jwks")
    async with client(service_app(name, prod)) as http:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert (await http.get(path)).status_code == 404, path
    async with client(service_app(name, settings())) as http:
        assert (await http.get("/docs")).status_code == 200


async def test_readyz_names_no_exception_text_when_the_database_is_down():
    port = free_port()

    async def database() -> str | None:
        conn = await asyncpg.connect(f"postgresql://intake_app:pw@127.0.0.1:{port}/clms", timeout=2)
        await conn.close()
        return None

    app = FastAPI()
    app.include_router(ops_router(registry=CollectorRegistry(), checks={"database": database}))
    async with client(app) as http:
        r = await http.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"status": "not ready", "checks": {"database": "unavailable"}}
    assert str(port) not in r.text and "127.0.0.1" not in r.text and "Error" not in r.text


def test_claims_model_is_unchanged_by_verification():
    s = settings()
    assert Verifier(s, service="intake").verify(mint_token(s, **PERSON)) == Claims(
        sub="police.prizren.duty", agency="police", municipality="prizren", roles=("reporter",))


async def test_bad_tokens_on_reads_count_as_failed_sign_ins_too():
    s = settings()
    async with client(service_app("analytics", s)) as http:
        codes = [(await http.get("/v1/counts/municipalities", headers={"Authorization": f"Bearer bad{n}"})).status_code
                 for n in range(30)]
        assert codes[0] == 401 and codes[-1] == 429, codes
        # the address is slowed down, whatever token it sends now
        good = mint_token(s, **{**PERSON, "agency": "coordinator", "roles": ["coordinator"]})
        r = await http.get("/v1/counts/municipalities", headers={"Authorization": f"Bearer {good}"})
        assert r.status_code == 429 and r.headers["Retry-After"]
