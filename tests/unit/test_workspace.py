"""The workspace without the other services: its words, the identification form, the error
sentences, sessions and the pages it renders (FastAPI's TestClient; the public APIs it calls are
answered by httpx.MockTransport where a test needs a particular answer)."""

from __future__ import annotations

import re
from dataclasses import replace
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from services.workspace import models
from services.workspace.app import create_app
from services.workspace.models import Words
from shared.auth import Verifier
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def full_form(**over: str) -> dict[str, str]:
    form = {
        "municipality": "prizren", "identified_on": "2026-11-20", "report_source": "officer",
        "child.given_name": " Qendresa ", "child.family_name": "Xhemajli", "child.date_of_birth": "2014-08-01",
        "child.estimated_age": "", "child.sex": "female", "child.community": "roma",
        "child.school_status": "dropped_out", "child.guardian.name": "", "child.guardian.relationship": "mother",
        "child.guardian.phone": "+383 44 987 654", "work.activity": "scrap_metal_waste:scrap_collection",
        "work.hazardous": "on", "notes": "",
    }
    form.update(over)
    return form


# --- words ----------------------------------------------------------------------------------------------


def test_every_word_and_label_exists_in_albanian_serbian_and_english():
    data = models.messages()
    missing = [k for k, v in data["text"].items() if set(v) != set(models.LANGUAGES)]
    missing += [f"{kind}.{k}" for kind, m in data["labels"].items() for k, v in m.items()
                if set(v) != set(models.LANGUAGES) or not all(isinstance(x, str) and x for x in v.values())]
    assert not missing


def test_templates_use_only_words_that_exist():
    used = set()
    for path in (ROOT / "services/workspace/templates").glob("*.html"):
        used |= set(re.findall(r"\bt\('([a-z_]+)'\)", path.read_text()))
    assert used and not used - set(models.messages()["text"])


def test_codes_read_as_words_in_the_users_language():
    assert Words("en").label("agency", "csw") == "Centre for Social Work"
    assert Words("sq").label("agency", "csw") == "Qendra për Punë Sociale"
    assert Words("sr").office("education.prizren") == "Opštinska direkcija za obrazovanje Prizren"
    assert Words("en").label("sector", "unknown_code") == "unknown code"  # never a crash on a new code


def test_language_follows_the_browser_then_albanian():
    assert models.language_from_header("sr-Latn-RS,sr;q=0.9,en;q=0.5") == "sr"
    assert models.language_from_header("de-DE,en;q=0.8") == "en"
    assert models.language_from_header(None) == "sq"


def test_deadlines_count_down_and_overdue_is_said_in_words():
    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    pending = {"status": "pending", "overdue": False, "deadline": (now + timedelta(hours=3, minutes=20)).isoformat()}
    assert models.deadline_view(pending, Words("en"), now=now) == models.DeadlineView("3 h 20 min left", False)
    late = {**pending, "deadline": (now - timedelta(hours=2)).isoformat(), "overdue": True}
    assert models.deadline_view(late, Words("en"), now=now) == models.DeadlineView("overdue by 2 h 0 min", True)
    acted = {**pending, "status": "accepted"}
    assert models.deadline_view(acted, Words("en"), now=now).text == ""


# --- development officers ---------------------------------------------------------------------------------


def test_the_seeded_officers_of_prizren_with_the_roles_their_work_needs():
    subs = {o.sub: o for o in models.officers_of("prizren")}
    assert {"csw.prizren.duty", "police.prizren.duty", "coordinator.prizren", "education.prizren.supervisor"} <= set(subs)
    assert set(subs["police.prizren.duty"].roles) == {"duty_officer", "caseworker", "reporter"}
    assert "reporter" not in subs["prosecution.prizren.duty"].roles  # prosecutors do not identify children
    assert subs["coordinator.prizren"].roles == ("coordinator",)
    assert models.officer("csw.prizren.duty") == subs["csw.prizren.duty"]
    assert models.officer("csw.atlantis.duty") is None and models.officer("root") is None


def test_activity_list_is_intakes():
    intake = yaml.safe_load((ROOT / "services/intake/activities.yaml").read_text())
    assert models.activities() == intake


# --- the identification form -----------------------------------------------------------------------------


def test_a_filled_form_becomes_the_identification_body():
    parsed = models.parse_identification(full_form(), Words("en"))
    assert parsed.errors == {}
    assert parsed.body == {
        "municipality": "prizren", "identified_on": "2026-11-20", "report_source": "officer",
        "child": {"given_name": "Qendresa", "family_name": "Xhemajli", "sex": "female",
                  "date_of_birth": "2014-08-01", "community": "roma", "school_status": "dropped_out",
                  "guardian": {"relationship": "mother", "phone": "+383 44 987 654"}},
        "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection", "hazardous": True,
                 "employer_involved": False},
    }


def test_missing_fields_are_named_in_the_users_language():
    parsed = models.parse_identification(full_form(**{"child.given_name": "", "child.date_of_birth": "",
                                                      "work.activity": ""}), Words("sq"))
    assert parsed.errors == {"child.given_name": "Kjo fushë kërkohet.", "work.activity": "Kjo fushë kërkohet.",
                             "child.date_of_birth": "Jepni datën e lindjes ose moshën e vlerësuar (0–17)."}
    parsed = models.parse_identification(full_form(**{"child.date_of_birth": "", "child.estimated_age": "twelve"}),
                                         Words("en"))
    assert parsed.errors == {"child.estimated_age": "Enter a whole number."}


def test_intake_422_errors_land_next_to_their_fields():
    errors = [
        {"field": "child.guardian.phone", "message": "String should match pattern '^\\+?[0-9]...'",
         "type": "string_pattern_mismatch"},
        {"field": "child.sex", "message": "Field required", "type": "missing"},
        {"field": "body", "message": "child.date_of_birth: the child was 19 on identified_on; only children aged 0-17 can be reported"},
        {"field": "work", "message": "unknown activity 'x' for sector 'begging'; allowed: begging, forced_begging"},
        {"field": "identified_on", "message": "must not be in the future (today is 2026-11-29)"},
        {"field": "body", "message": "something about the whole request"},
    ]
    per_field, general = models.field_errors(errors)
    assert per_field == {
        "child.guardian.phone": "Use digits, spaces, ( ) and - only, with a leading + if needed, e.g. +383 44 123 456.",
        "child.sex": "This field is required.",
        "child.date_of_birth": "The child was 19 on identified_on; only children aged 0-17 can be reported",
        "work.activity": "Unknown activity 'x' for sector 'begging'; allowed: begging, forced_begging",
        "identified_on": "Must not be in the future (today is 2026-11-29)",
    }
    assert general == ["something about the whole request"]


# --- pages ------------------------------------------------------------------------------------------------


def settings(**env: str) -> Settings:
    # ports nobody listens on: an API call that is not mocked is "not available"
    return Settings(_env_file=None, INTAKE_PORT="9", REFERRAL_PORT="9", NOTIFICATIONS_PORT="9",
                    ANALYTICS_PORT="9", **env)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def signed_in(client: TestClient, sub: str = "police.prizren.duty") -> str:
    page = client.get("/signin", headers={"accept-language": "en"})
    r = client.post("/signin", data={"csrf": csrf_of(page.text), "sub": sub, "next": "/report"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/report"
    return csrf_of(client.get("/report").text)


def answer_with(client: TestClient, handler) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    deps = client.app.state.deps  # frozen: the routes read the replaced one on the next request
    client.app.state.deps = replace(deps, client=httpx.AsyncClient(transport=httpx.MockTransport(record)))
    return seen


def test_sign_in_lists_the_seeded_officers_and_sets_a_safe_cookie():
    with TestClient(create_app(settings())) as client:
        page = client.get("/signin?municipality=prizren", headers={"accept-language": "en"})
        assert page.status_code == 200
        for sub in ("csw.prizren.duty", "police.prizren.duty", "coordinator.prizren"):
            assert f'value="{sub}"' in page.text
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Secure" not in cookie
        assert "script-src 'self'" in page.headers["content-security-policy"]
        before = client.cookies["clms_ws"]
        signed_in(client)
        assert client.cookies["clms_ws"] != before, "a new session id at sign-in"


def test_the_token_stays_on_the_server():
    app = create_app(settings())
    with TestClient(app) as client:
        signed_in(client)
        session = next(iter(app.state.deps.sessions._by_id.values()))
        assert Verifier(app.state.settings).verify(session.token).sub == "police.prizren.duty"
        for path in ("/report", "/signin"):
            assert session.token not in client.get(path).text
        assert session.token not in str(client.cookies)


def test_production_cookie_is_secure_and_the_development_sign_in_is_off():
    prod = settings(CLMS_ENV="production", JWT_SECRET="x" * 40, CHILD_REF_KEY="y" * 40,
                    ENCRYPTION_MASTER_KEY="cHJvZC1rZXktcHJvZC1rZXktcHJvZC1rZXktMzJieQ==", WEBHOOK_SECRET="z" * 40,
                    IDEMPOTENCY_HMAC_KEY="i" * 40)
    with TestClient(create_app(prod), base_url="https://testserver") as client:
        page = client.get("/signin", headers={"accept-language": "en"})
        assert "Secure" in page.headers["set-cookie"]
        assert "not configured" in page.text and 'name="sub"' not in page.text
        r = client.post("/signin", data={"csrf": csrf_of(page.text), "sub": "csw.prizren.duty"})
        assert r.status_code == 403


def test_a_post_without_the_sessions_csrf_token_is_refused():
    with TestClient(create_app(settings())) as client:
        signed_in(client)
        r = client.post("/report", data={"csrf": "forged", "child.given_name": "A"})
        assert r.status_code == 403 and "The form has expired" in r.text
        r = client.post("/signin", data={"sub": "coordinator.prizren"})
        assert r.status_code == 403


@pytest.mark.parametrize("given, kept", [
    ("/referrals/1?x=2", "/referrals/1?x=2"), ("//evil.example", "/"), ("/\\evil.example", "/"),
    ("/\t/evil.example", "/"), ("https://evil.example", "/"), ("", "/"), (None, "/"),
])
def test_only_a_path_of_this_site_is_a_place_to_return_to(given, kept):
    from services.workspace.views import safe_next

    assert safe_next(given) == kept


def test_pages_need_a_signed_in_user():
    with TestClient(create_app(settings())) as client:
        r = client.get("/referrals", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/signin?next=/referrals"


def test_form_errors_are_next_to_their_fields_and_readable_by_a_screen_reader():
    with TestClient(create_app(settings())) as client:
        csrf = signed_in(client)
        r = client.post("/report", data={"csrf": csrf, **full_form(**{"child.given_name": ""})})
        assert r.status_code == 422
        assert '<p class="field-error" id="err-child-given_name">This field is required.</p>' in r.text
        field = re.search(r'<input type="text" id="f-child-given_name"[^>]*>', r.text).group(0)
        assert 'aria-invalid="true"' in field and 'aria-describedby="err-child-given_name"' in field
        assert '<label for="f-child-given_name">Given name' in r.text


def test_a_503_says_try_again_shortly_and_keeps_the_form_and_its_idempotency_key():
    with TestClient(create_app(settings())) as client:
        csrf = signed_in(client)
        r = client.post("/report", data={"csrf": csrf, "idempotency_key": "key-1", **full_form()})
        assert r.status_code == 503
        assert "Try again shortly; your form is kept." in r.text
        assert 'value="key-1"' in r.text and 'value="Qendresa"' in r.text.replace('value=" Qendresa "', 'value="Qendresa"')


def test_the_report_sends_the_idempotency_key_and_shows_the_case():
    case_id = uuid.uuid4()
    with TestClient(create_app(settings())) as client:
        csrf = signed_in(client)
        seen = answer_with(client, lambda req: httpx.Response(201, json={
            "case_id": str(case_id), "child_ref": "cr_x", "linked_case_id": None, "status": "open"}))
        r = client.post("/report", data={"csrf": csrf, "idempotency_key": "key-2", **full_form()},
                        follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/report/{case_id}"
        assert seen[0].headers["Idempotency-Key"] == "key-2"
        assert seen[0].headers["Authorization"].startswith("Bearer ")


def test_an_api_422_and_403_are_sentences_on_the_page():
    with TestClient(create_app(settings())) as client:
        csrf = signed_in(client)
        answer_with(client, lambda req: httpx.Response(422, json={
            "detail": "identified_on: must not be in the future (today is 2026-11-29)",
            "errors": [{"field": "identified_on", "message": "must not be in the future (today is 2026-11-29)",
                        "type": "value_error"}]}))
        r = client.post("/report", data={"csrf": csrf, **full_form()})
        assert r.status_code == 422
        assert ('<p class="field-error" id="err-identified_on">Must not be in the future (today is 2026-11-29)</p>'
                in r.text)

        answer_with(client, lambda req: httpx.Response(403, json={
            "detail": "education/gjakove may not see case 1: a case is open to the reporting agency office"}))
        r = client.get(f"/cases/{uuid.uuid4()}")
        assert r.status_code == 403
        assert "You may not do this: education/gjakove may not see case 1" in r.text


def test_an_expired_token_signs_out():
    with TestClient(create_app(settings())) as client:
        signed_in(client)
        answer_with(client, lambda req: httpx.Response(401, json={"detail": "invalid token: expired"}))
        r = client.get("/inbox", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/signin")


def test_the_referral_page_offers_the_actions_the_api_allows():
    rid, cid = uuid.uuid4(), uuid.uuid4()
    referral = {
        "referral_id": str(rid), "case_id": str(cid), "municipality": "prizren", "agency": "csw",
        "office_id": "csw.prizren", "status": "acknowledged", "priority": "urgent", "rule_id": "csw-every-child",
        "rule_version": 1, "matched_rules": [], "legal_basis": "Law 04/L-081, Art. 2", "age_band": "10_14",
        "sector": "scrap_metal_waste", "reported_by": "police.prizren.duty",
        "deadline": (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(), "overdue": True,
        "escalated": True, "actions": ["accept", "decline"], "history": [],
    }
    with TestClient(create_app(settings())) as client:
        signed_in(client, "csw.prizren.duty")
        answer_with(client, lambda req: httpx.Response(200, json=referral))
        r = client.get(f"/referrals/{rid}")
        assert r.status_code == 200
        assert "Law 04/L-081, Art. 2" in r.text and "overdue by" in r.text and "Escalated" in r.text
        assert f'action="/referrals/{rid}/accept"' in r.text and f'action="/referrals/{rid}/decline"' in r.text
        assert f'action="/referrals/{rid}/acknowledge"' not in r.text
        assert '<label for="reason">Reason for declining</label>' in r.text


def test_sessions_end_when_idle_or_when_the_token_expires():
    from services.workspace.sessions import Sessions
    from shared.auth import Claims

    store = Sessions(idle_s=0.0)
    s = store.new(language="en")
    assert store.get(s.id) is None, "idle longer than allowed"
    store = Sessions()
    claims = Claims(sub="csw.prizren.duty", agency="csw", municipality="prizren", roles=("duty_officer",))
    s = store.sign_in(store.new(language="en"), token="t", claims=claims, expires_at=0.0)
    assert store.get(s.id) is s and not s.signed_in, "an expired token is signed out"


def test_pages_are_not_cached_and_send_no_referrer():
    with TestClient(create_app(settings())) as client:
        r = client.get("/signin")
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["referrer-policy"] == "no-referrer"


def test_the_chosen_language_is_kept_for_the_user_across_sign_ins():
    app = create_app(settings())
    with TestClient(app) as client:
        csrf = signed_in(client)
        client.post("/language", data={"csrf": csrf, "language": "sr", "next": "/report"})
        assert '<html lang="sr-Latn">' in client.get("/report").text
        client.post("/signout", data={"csrf": csrf_of(client.get("/report").text)})
        assert '<html lang="sr-Latn">' in client.get("/signin").text
    with TestClient(app) as other_browser:  # the same officer elsewhere, an English browser
        page = other_browser.get("/signin", headers={"accept-language": "en"})
        assert '<html lang="en">' in page.text
        other_browser.post("/signin", data={"csrf": csrf_of(page.text), "sub": "police.prizren.duty"})
        assert '<html lang="sr-Latn">' in other_browser.get("/report").text
