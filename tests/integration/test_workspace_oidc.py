"""The workspace's production sign-in: OpenID Connect authorization code with PKCE (S256) against
an identity provider over real HTTP. The provider here is a small one written for the test (a
FastAPI app under uvicorn on a free port: discovery, authorize, token, JWKS, RS256 tokens); it
refuses a token request whose code verifier does not match the challenge, as a real one does."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.testclient import TestClient

from services.workspace.app import create_app
from shared.embedded import free_port
from shared.settings import Settings
from tests.apps import served_in_thread

pytestmark = pytest.mark.integration

WORKSPACE = "https://testserver"
CLIENT_ID = "clms-workspace"


class Provider:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.user: dict = {}
        self.codes: dict[str, dict] = {}
        self.token_requests: list[dict] = []
        self.app = self._app()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/.well-known/openid-configuration")
        async def discovery() -> dict:
            return {"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token", "jwks_uri": f"{self.url}/jwks",
                    "code_challenge_methods_supported": ["S256"]}

        @app.get("/authorize")
        async def authorize(request: Request):
            q = request.query_params
            if (q.get("response_type") != "code" or q.get("client_id") != CLIENT_ID
                    or q.get("code_challenge_method") != "S256" or not q.get("code_challenge")):
                return JSONResponse({"error": "invalid_request"}, status_code=400)
            code = secrets.token_urlsafe(16)
            self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"],
                                "user": dict(self.user)}
            return RedirectResponse(f"{q['redirect_uri']}?code={code}&state={q['state']}", status_code=302)

        @app.post("/token")
        async def token(grant_type: str = Form(), code: str = Form(), redirect_uri: str = Form(),
                        code_verifier: str = Form(), client_id: str = Form()):
            self.token_requests.append({"code_verifier": code_verifier, "client_id": client_id})
            grant = self.codes.pop(code, None)
            challenge = base64.urlsafe_b64encode(hashlib.sha256(code_verifier.encode()).digest()).rstrip(b"=").decode()
            if (grant is None or grant_type != "authorization_code" or grant["redirect_uri"] != redirect_uri
                    or not secrets.compare_digest(challenge, grant["challenge"]) or client_id != CLIENT_ID):
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            now = int(time.time())
            claims = {"iss": self.url, "aud": ["clms-intake", "clms-referral", "clms-notifications", "clms-analytics"],
                      "iat": now, "exp": now + 600, **grant["user"]}
            access = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "k1"})
            return {"access_token": access, "token_type": "Bearer", "expires_in": 600}

        @app.get("/jwks")
        async def jwks() -> dict:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
            return {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}

        return app


@pytest.fixture(scope="module")
def provider():
    p = Provider()
    with served_in_thread(p.app, port=p.port, what="the test identity provider"):
        yield p


def workspace(provider: Provider) -> TestClient:
    settings = Settings(
        _env_file=None, CLMS_ENV="production", JWT_SECRET="s" * 40, CHILD_REF_KEY="c" * 40,
        ENCRYPTION_MASTER_KEY="cHJvZC1rZXktcHJvZC1rZXktcHJvZC1rZXktMzJieQ==", WEBHOOK_SECRET="w" * 40,
        IDEMPOTENCY_HMAC_KEY="i" * 40, WORKSPACE_URL=WORKSPACE, OIDC_ISSUER=provider.url, OIDC_CLIENT_ID=CLIENT_ID,
        OIDC_JWKS_URL=f"{provider.url}/jwks", JWT_ISSUER=provider.url, JWT_AUDIENCE="clms",
    )
    return TestClient(create_app(settings), base_url=WORKSPACE)


def through_the_provider(client: TestClient, next_path: str = "/referrals") -> httpx.Response:
    """Browser steps: start at the workspace, visit the provider, come back with the code."""
    start = client.get(f"/signin/oidc?next={next_path}", follow_redirects=False)
    assert start.status_code == 303, start.text
    to_provider = start.headers["location"]
    query = parse_qs(urlsplit(to_provider).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert "code_verifier" not in query, "the PKCE verifier never leaves the server"
    assert query["redirect_uri"] == [f"{WORKSPACE}/signin/callback"]
    back = httpx.get(to_provider, follow_redirects=False)
    assert back.status_code == 302, back.text
    callback = urlsplit(back.headers["location"])
    return client.get(f"{callback.path}?{callback.query}", follow_redirects=False)


def test_sign_in_with_the_identity_provider_and_pkce(provider):
    provider.user = {"sub": "csw.prizren.duty", "agency": "csw", "municipality": "prizren",
                     "roles": ["duty_officer", "caseworker"]}
    with workspace(provider) as client:
        page = client.get("/signin")
        assert 'href="/signin/oidc?next=/"' in page.text
        assert 'name="sub"' not in page.text, "no development sign-in in production"
        done = through_the_provider(client)
        assert done.status_code == 303 and done.headers["location"] == "/referrals", done.text
        cookie = done.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie
        session = next(iter(client.app.state.deps.sessions._by_id.values()))
        assert session.signed_in and session.claims.sub == "csw.prizren.duty"
        assert session.token not in cookie
        assert provider.token_requests[-1]["client_id"] == CLIENT_ID


def test_a_callback_that_did_not_start_here_is_refused(provider):
    with workspace(provider) as client:
        client.get("/signin")
        r = client.get("/signin/callback?code=abc&state=forged")
        assert r.status_code == 403 and "did not start here" in r.text


def test_an_account_whose_token_the_services_would_refuse_is_told_why(provider):
    provider.user = {"sub": "someone", "municipality": "prizren", "roles": []}  # no agency claim
    with workspace(provider) as client:
        r = through_the_provider(client)
        assert r.status_code == 403
        assert "the services would refuse this account&#39;s token: invalid token claim agency" in r.text
