"""shared.errors: every service's use cases raise one hierarchy, mapped to HTTP once (shared.web)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared import errors
from shared.web import install_error_handlers


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{kind}")
    def _raise(kind: str) -> None:
        if kind == "conflict":
            raise errors.Conflict("already closed", detail={"message": "already closed", "current_status": "closed"})
        raise {"invalid": errors.Invalid, "unauthenticated": errors.Unauthenticated, "forbidden": errors.Forbidden,
               "not_found": errors.NotFound, "unavailable": errors.Unavailable}[kind](f"{kind}: a sentence")

    return app


def test_each_error_maps_to_its_status_with_the_sentence_the_user_sees():
    client = TestClient(_app())
    for kind, status in [("invalid", 422), ("unauthenticated", 401), ("forbidden", 403), ("not_found", 404),
                         ("unavailable", 503)]:
        answer = client.get(f"/raise/{kind}")
        assert answer.status_code == status, kind
        assert answer.json() == {"detail": f"{kind}: a sentence"}
        assert "x-correlation-id" in answer.headers


def test_a_conflict_carries_a_structured_detail_and_unavailable_says_when_to_retry():
    client = TestClient(_app())
    answer = client.get("/raise/conflict")
    assert answer.status_code == 409
    assert answer.json() == {"detail": {"message": "already closed", "current_status": "closed"}}
    assert client.get("/raise/unavailable").headers["retry-after"] == "5"
