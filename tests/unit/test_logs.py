"""Log lines carry ids, never personal data."""

from __future__ import annotations

import json
import logging

import structlog

from shared.logs import bound, bound_to_envelope, configure_logging
from tests import builders


def _capture(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


def test_event_context_is_on_every_line_and_personal_values_are_redacted(capsys):
    configure_logging("intake", level="INFO", json=True)
    env = builders.envelope()
    log = structlog.get_logger("t")
    with bound_to_envelope(env):
        log.info("case stored", given_name="Arben", guardian_phone="+383 44 123 456")
        logging.getLogger("lib").warning("could not mail ops@example.org or call +383 44 123 456")
    with bound(correlation_id="c-1"):
        try:
            raise ValueError("bad phone 044-123-4567 for child")
        except ValueError:
            logging.getLogger("lib").exception("handler failed")
    lines = _capture(capsys)
    assert len(lines) == 3
    first, second, third = lines
    for line in (first, second):
        assert line["service"] == "intake"
        assert line["event_id"] == str(env.id) and line["case_id"] == env.subject
        assert line["correlation_id"] == env.correlationid
    text = json.dumps(lines)
    for secret in ("Arben", "123 456", "ops@example.org", "044-123-4567"):
        assert secret not in text, secret
    assert first["given_name"] == "[redacted]"
    assert third["correlation_id"] == "c-1" and "event_id" not in third
    assert "ValueError" in third["exception"]


async def test_every_request_gets_a_correlation_id_bound_to_its_logs():
    import httpx
    from fastapi import FastAPI

    from shared.logs import current_correlation_id
    from shared.web import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/x")
    async def x() -> dict:
        return {"cid": current_correlation_id()}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        given = await c.get("/x", headers={"X-Correlation-Id": "abc-123"})
        assert given.json() == {"cid": "abc-123"} and given.headers["x-correlation-id"] == "abc-123"
        fresh = await c.get("/x", headers={"X-Correlation-Id": "bad value with spaces"})
        assert fresh.json()["cid"] == fresh.headers["x-correlation-id"] != "bad value with spaces"
    assert current_correlation_id() is None


async def test_trace_context_from_the_request_travels_into_events_and_kafka_headers():
    import httpx
    from fastapi import FastAPI

    from shared.events import Envelope
    from shared.web import install_error_handlers
    from tests import builders

    app = FastAPI()
    install_error_handlers(app)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    @app.post("/identify")
    async def identify() -> dict:
        first = Envelope.wrap(builders.case_identified(), source="police/prizren", subject="c1")
        later = first.follow(builders.one_of_each()[1], source="referral")
        return {"first": first.to_dict(), "later": later.to_dict(), "headers": dict(
            (k, v.decode()) for k, v in later.headers())}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = (await c.post("/identify", headers={"traceparent": tp, "X-Correlation-Id": "corr-9"})).json()
        untraced = (await c.post("/identify", headers={"traceparent": "garbage"})).json()
    assert body["first"]["traceparent"] == tp and body["later"]["traceparent"] == tp
    assert body["first"]["correlationid"] == "corr-9" == body["later"]["correlationid"]
    assert body["headers"]["traceparent"] == tp
    assert untraced["first"]["traceparent"] is None and "traceparent" not in untraced["headers"]
