"""Pages of the workspace (thin: read the form, call a use case in `service`, render a template).

Every page needs a signed-in session except the sign-in page; every POST carries the session's
CSRF token. API answers keep their meaning: 403/404/409/422 are shown as a sentence, a 503 (or
no answer) as "try again shortly" with the form kept; a 401 (the token expired) signs out.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sse_starlette.sse import EventSourceResponse

from services.workspace import models, oidc, service
from services.workspace.deps import Deps, DepsDep, deps_of
from services.workspace.models import LANGUAGE_NAMES, LANGUAGES, Words
from services.workspace.service import ApiError
from services.workspace.sessions import COOKIE, Session, Sessions, same
from shared import access
from shared.auth import Claims, mint_token
from shared.events import CaseClosedReason, Community, DeclineReason, ReferralOutcome, ReportSource, Sex, SchoolStatus
from shared.reference import municipalities
from shared.settings import Environment, Settings

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals.update(local_time=models.local_time)
templates.env.filters["labelled"] = lambda codes, label, kind: [(c, label(kind, c)) for c in codes]

router = APIRouter(include_in_schema=False)

_IDEMPOTENCY = re.compile(r"^[\x21-\x7e]{1,200}$")
RELATIONSHIPS = ("mother", "father", "grandparent", "sibling", "other_relative", "legal_guardian", "other")
CASE_EVENTS = ("child_withdrawn", "school_enrolled", "closed")


class SignInRequired(Exception):
    def __init__(self, next_path: str):
        self.next_path = next_path


# --- plumbing -----------------------------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    return deps_of(request).settings


def _sessions(request: Request) -> Sessions:
    return deps_of(request).sessions


def session_of(request: Request) -> Session:
    """The visitor's session (a new, signed-out one on a first visit: it carries the CSRF token
    of the sign-in form)."""
    s = _sessions(request).get(request.cookies.get(COOKIE))
    if s is None:
        s = _sessions(request).new(language=models.language_from_header(request.headers.get("accept-language")))
    request.state.session = s
    return s


def user_of(request: Request) -> Session:
    s = session_of(request)
    if not s.signed_in:
        raise SignInRequired(request.url.path)
    return s


def _token(s: Session) -> str:
    assert s.token is not None
    return s.token


def _claims(s: Session) -> Claims:
    assert s.claims is not None
    return s.claims


def finish(request: Request, response: Response) -> Response:
    """Session cookie and the headers every page carries (no caching: pages show personal data)."""
    s: Session | None = getattr(request.state, "session", None)
    if s is not None:
        secure = _settings(request).environment is Environment.production
        response.set_cookie(COOKIE, s.id, httponly=True, samesite="lax", secure=secure, path="/")
    response.headers["Cache-Control"] = "no-store"
    return response


_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~%?=&-]*")


def safe_next(value: str | None) -> str:
    """Only a path of this site is a place to go back to: never //host, a scheme, a backslash or
    a control character a browser would strip (`/\t/evil.example` is `//evil.example` to it)."""
    return value if value and _LOCAL_PATH.fullmatch(value) else "/"


def redirect(request: Request, to: str) -> Response:
    return finish(request, RedirectResponse(to, status_code=303))


def context(request: Request, s: Session, **kw: Any) -> dict[str, Any]:
    words = Words(s.language)
    claims = s.claims if s.signed_in else None
    flash = getattr(s, "flash", None)
    s.flash = None
    return {
        "request": request, "t": words.t, "label": words.label, "words": words, "lang": s.language,
        "html_lang": "sr-Latn" if s.language == "sr" else s.language,
        "languages": [(code, LANGUAGE_NAMES[code]) for code in LANGUAGES],
        "csrf": s.csrf, "claims": claims, "flash": flash, "path": request.url.path,
        # shared/access_policy.yaml decides; the intake API enforces the same rule
        "may_report": bool(claims) and access.policy().reach(claims, "case.create") is not None,
        "is_coordinator": bool(claims) and claims.is_coordinator,
        **kw,
    }


def page(request: Request, s: Session, name: str, status_code: int = 200, **kw: Any) -> Response:
    response = templates.TemplateResponse(request, name, context(request, s, **kw), status_code=status_code)
    return finish(request, response)


def problem(words: Words, exc: ApiError, *, form: bool = False) -> str:
    """An API refusal as one sentence for a person."""
    if exc.status == service.UNAVAILABLE:
        return words.t("try_again_shortly" if form else "try_again_shortly_page")
    prefix = {403: "not_allowed", 404: "not_found", 409: "conflict", 422: "not_valid"}.get(exc.status)
    return f"{words.t(prefix)} {exc.detail}" if prefix else exc.detail


def status_of(exc: ApiError) -> int:
    return exc.status if exc.status in (403, 404, 409, 422, 503) else 502


async def form_of(request: Request, s: Session) -> dict[str, str] | None:
    """The posted form, or None when its CSRF token is not this session's."""
    form = await request.form()
    data = {k: str(v) for k, v in form.items()}
    return data if same(data.get("csrf"), s.csrf) else None


def csrf_refused(request: Request, s: Session) -> Response:
    return page(request, s, "message.html", status_code=403, title=Words(s.language).t("csrf_failed"),
                message=Words(s.language).t("csrf_failed"))


def api_refused(request: Request, s: Session, exc: ApiError, *, title: str) -> Response:
    if exc.status == 401:
        _sessions(request).sign_out(s)
        s2 = session_of(request)
        s2.flash = Words(s2.language).t("session_expired")
        return redirect(request, f"/signin?next={quote(request.url.path)}")
    return page(request, s, "message.html", status_code=status_of(exc), title=title,
                message=problem(Words(s.language), exc))


# --- sign-in, sign-out, language -----------------------------------------------------------------------


@router.get("/")
async def home(request: Request) -> Response:
    s = session_of(request)
    if not s.signed_in:
        return redirect(request, "/signin")
    return redirect(request, "/coordinator" if _claims(s).is_coordinator else "/inbox")


def _dev_sign_in_allowed(settings: Settings) -> bool:
    return settings.environment is not Environment.production


@router.get("/signin")
async def signin_page(request: Request, municipality: str = "prizren", next: str = "/") -> Response:
    s = session_of(request)
    if municipality not in municipalities():
        municipality = "prizren"
    dev = _dev_sign_in_allowed(_settings(request))
    return page(request, s, "signin.html", dev=dev, oidc=oidc.enabled(_settings(request)),
                next=safe_next(next), municipality=municipality,
                municipalities=list(municipalities().values()),
                officers=models.officers_of(municipality) if dev else [])


@router.get("/signin/oidc")
async def signin_oidc(request: Request, deps: DepsDep, next: str = "/") -> Response:
    """Start the OpenID Connect sign-in: to the identity provider, with a PKCE challenge."""
    s = session_of(request)
    words = Words(s.language)
    settings = _settings(request)
    if not oidc.enabled(settings):
        return page(request, s, "message.html", status_code=404, title=words.t("sign_in_title"),
                    message=words.t("oidc_not_configured"))
    try:
        url, pending = await oidc.start(deps.client, settings=settings, next_path=safe_next(next))
    except oidc.SignInFailed as exc:
        return page(request, s, "message.html", status_code=503, title=words.t("sign_in_title"),
                    message=f"{words.t('sign_in_failed')} {exc}")
    s.oidc_pending = pending
    return redirect(request, url)


@router.get("/signin/callback")
async def signin_callback(request: Request, deps: DepsDep, code: str | None = None, state: str | None = None,
                          error: str | None = None) -> Response:
    """The identity provider sends the browser back here with the authorization code."""
    s = session_of(request)
    words = Words(s.language)
    pending = s.oidc_pending if isinstance(s.oidc_pending, oidc.Pending) else None
    s.oidc_pending = None  # one use
    try:
        done = await oidc.finish(deps.client, settings=_settings(request),
                                 verifier=deps.verifier, pending=pending, state=state,
                                 code=code, error=error)
    except oidc.SignInFailed as exc:
        return page(request, s, "message.html", status_code=403, title=words.t("sign_in_title"),
                    message=f"{words.t('sign_in_failed')} {exc}")
    return _signed_in(request, s, token=done.token, claims=done.claims, expires_at=done.expires_at,
                      next_path=pending.next_path if pending else "/")


@router.post("/signin")
async def signin(request: Request) -> Response:
    s = session_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    settings = _settings(request)
    if not _dev_sign_in_allowed(settings):
        return page(request, s, "message.html", status_code=403, title=Words(s.language).t("sign_in_title"),
                    message=Words(s.language).t("oidc_not_configured"))
    officer = models.officer(form.get("sub", ""))
    if officer is None:
        return page(request, s, "message.html", status_code=422, title=Words(s.language).t("sign_in_title"),
                    message=Words(s.language).t("unknown_officer"))
    ttl = 12 * 3600
    token = mint_token(settings, sub=officer.sub, agency=officer.agency, municipality=officer.municipality,
                       roles=officer.roles, ttl_s=ttl)
    claims = Claims(sub=officer.sub, agency=officer.agency, municipality=officer.municipality, roles=officer.roles)
    return _signed_in(request, s, token=token, claims=claims, expires_at=time.time() + ttl - 60,
                      next_path=safe_next(form.get("next")))


def _signed_in(request: Request, s, *, token: str, claims: Claims, expires_at: float,  # noqa: ANN001
               next_path: str) -> Response:
    """Both sign-ins end here: a new session, then the page asked for or the user's landing page."""
    request.state.session = _sessions(request).sign_in(s, token=token, claims=claims, expires_at=expires_at)
    if next_path == "/":
        next_path = "/coordinator" if claims.is_coordinator else "/inbox"
    return redirect(request, next_path)


@router.post("/signout")
async def signout(request: Request) -> Response:
    s = session_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    _sessions(request).sign_out(s)
    request.state.session = _sessions(request).new(language=s.language)
    return redirect(request, "/signin")


@router.post("/language")
async def set_language(request: Request) -> Response:
    s = session_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    lang = models.pick_language(form.get("language"))
    if lang:
        _sessions(request).set_language(s, lang)
    return redirect(request, safe_next(form.get("next")))


# --- inbox ----------------------------------------------------------------------------------------------


@router.get("/inbox")
async def inbox_page(request: Request, deps: DepsDep) -> Response:
    s = user_of(request)
    try:
        box = await service.inbox(deps, token=_token(s))
    except ApiError as exc:
        return api_refused(request, s, exc, title=Words(s.language).t("inbox_title"))
    return page(request, s, "inbox.html", alerts=box["items"], unacked=box["unacked"])


@router.get("/inbox/stream")
async def inbox_stream(request: Request, deps: DepsDep) -> Response:
    """The user's alerts as they arrive, each as a rendered list item (htmx swaps it in). The
    workspace holds the upstream stream with the token; the browser only has its session cookie."""
    s = _sessions(request).get(request.cookies.get(COOKIE))
    if s is None or not s.signed_in:
        return Response(status_code=204)  # tells EventSource to stop reconnecting
    token, lang = _token(s), s.language

    async def events():  # noqa: ANN202
        words = Words(lang)
        try:
            async for event, data in service.alert_stream(deps, token=token):
                if event == "ready":
                    yield {"event": "ready", "data": words.t("live_connected")}
                elif event == "alert":
                    alert = orjson.loads(data)
                    html = templates.get_template("_alert.html").render(
                        alert=alert, t=words.t, label=words.label, csrf=s.csrf, live=True)
                    yield {"event": "alert", "id": alert.get("id"), "data": html}
        except (ApiError, httpx.HTTPError):
            return  # the browser's EventSource reconnects by itself

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-store"})


@router.post("/inbox/{alert_id}/ack")
async def ack_alert(request: Request, deps: DepsDep, alert_id: uuid.UUID) -> Response:
    s = user_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    try:
        await service.ack_alert(deps, token=_token(s), alert_id=alert_id)
    except ApiError as exc:
        return api_refused(request, s, exc, title=Words(s.language).t("inbox_title"))
    return redirect(request, "/inbox")


# --- referrals ------------------------------------------------------------------------------------------


def _with_deadlines(items: list[dict], words: Words) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [{**r, "countdown": models.deadline_view(r, words, now=now)} for r in items]


@router.get("/referrals")
async def referrals_page(request: Request, deps: DepsDep) -> Response:
    s = user_of(request)
    words = Words(s.language)
    try:
        items = await service.list_referrals(deps, token=_token(s))
    except ApiError as exc:
        return api_refused(request, s, exc, title=words.t("referrals_title"))
    return page(request, s, "referrals.html", referrals=_with_deadlines(items, words))


@router.get("/referrals/{referral_id}")
async def referral_page(request: Request, deps: DepsDep, referral_id: uuid.UUID, error: str | None = None,
                        status_code: int = 200) -> Response:
    s = user_of(request)
    words = Words(s.language)
    try:
        referral = await service.get_referral(deps, token=_token(s), referral_id=referral_id)
    except ApiError as exc:
        return api_refused(request, s, exc, title=words.t("referral_title"))
    return page(request, s, "referral.html", status_code=status_code, referral=_with_deadlines([referral], words)[0],
                error=error, decline_reasons=[r.value for r in DeclineReason],
                outcomes=[o.value for o in ReferralOutcome])


@router.post("/referrals/{referral_id}/{action}")
async def referral_action(request: Request, deps: DepsDep, referral_id: uuid.UUID, action: str) -> Response:
    s = user_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    words = Words(s.language)
    try:
        await service.act_on_referral(deps, token=_token(s), referral_id=referral_id, action=action,
                                      reason=form.get("reason") or None, outcome=form.get("outcome") or None)
    except ApiError as exc:
        if exc.status == 401:
            return api_refused(request, s, exc, title=words.t("referral_title"))
        return await referral_page(request, deps, referral_id, error=problem(words, exc), status_code=status_of(exc))
    s.flash = words.t(f"done_{action}")
    return redirect(request, f"/referrals/{referral_id}")


# --- cases ----------------------------------------------------------------------------------------------


@router.get("/cases/{case_id}")
async def case_page(request: Request, deps: DepsDep, case_id: uuid.UUID, error: str | None = None,
                    status_code: int = 200) -> Response:
    s = user_of(request)
    words = Words(s.language)
    try:
        case = await service.get_case(deps, token=_token(s), case_id=case_id)
    except ApiError as exc:
        return api_refused(request, s, exc, title=f"{words.t('case_title')} {case_id}")
    return page(request, s, "case.html", status_code=status_code, case=case, error=error,
                case_events=CASE_EVENTS, close_reasons=[r.value for r in CaseClosedReason],
                today=datetime.now(models.LOCAL_TZ).date().isoformat())


@router.post("/cases/{case_id}/events")
async def case_event(request: Request, deps: DepsDep, case_id: uuid.UUID) -> Response:
    s = user_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    words = Words(s.language)
    event: dict[str, Any] = {"type": form.get("type", ""), "on": form.get("on", "")}
    if event["type"] == "closed":
        event["reason"] = form.get("reason") or None
    try:
        await service.record_case_event(deps, token=_token(s), case_id=case_id, event=event)
    except ApiError as exc:
        if exc.status == 401:
            return api_refused(request, s, exc, title=words.t("case_title"))
        return await case_page(request, deps, case_id, error=problem(words, exc), status_code=status_of(exc))
    s.flash = words.t("event_recorded")
    return redirect(request, f"/cases/{case_id}")


# --- report a child -------------------------------------------------------------------------------------


def _report_form(request: Request, s: Session, *, values: dict[str, str], errors: dict[str, str],
                 message: str | None = None, status_code: int = 200) -> Response:
    words = Words(s.language)
    return page(request, s, "report.html", status_code=status_code, values=values, errors=errors, message=message,
                municipality_options=sorted(((m, words.municipality(m)) for m in municipalities()),
                                            key=lambda pair: pair[1]),
                activities=models.activities(), sexes=[x.value for x in Sex],
                communities=[x.value for x in Community], school_statuses=[x.value for x in SchoolStatus],
                report_sources=[x.value for x in ReportSource], relationships=RELATIONSHIPS,
                today=datetime.now(models.LOCAL_TZ).date().isoformat())


@router.get("/report")
async def report_page(request: Request) -> Response:
    s = user_of(request)
    values = {"municipality": _claims(s).municipality, "report_source": "officer",
              "identified_on": datetime.now(models.LOCAL_TZ).date().isoformat(),
              # one key per filled-in form: a retry of the same form never makes a second case
              "idempotency_key": str(uuid.uuid4())}
    return _report_form(request, s, values=values, errors={})


@router.post("/report")
async def report(request: Request, deps: DepsDep) -> Response:
    s = user_of(request)
    form = await form_of(request, s)
    if form is None:
        return csrf_refused(request, s)
    words = Words(s.language)
    values = {k: v for k, v in form.items() if k != "csrf"}
    if not _IDEMPOTENCY.match(values.get("idempotency_key", "")):
        values["idempotency_key"] = str(uuid.uuid4())
    parsed = models.parse_identification(form, words)
    if parsed.errors:
        return _report_form(request, s, values=values, errors=parsed.errors, message=words.t("fix_fields"),
                            status_code=422)
    try:
        answer = await service.report_child(deps, token=_token(s), body=parsed.body,
                                            idempotency_key=values["idempotency_key"])
    except ApiError as exc:
        if exc.status == 401:
            return api_refused(request, s, exc, title=words.t("report_title"))
        errors: dict[str, str] = {}
        message = problem(words, exc, form=True)
        if exc.status == 422:
            errors, general = models.field_errors(exc.errors, words)
            message = words.t("fix_fields") + (" " + " ".join(general) if general else "")
        return _report_form(request, s, values=values, errors=errors, message=message,
                            status_code=status_of(exc))
    return redirect(request, f"/report/{answer['case_id']}")


@router.get("/report/{case_id}")
async def reported_page(request: Request, deps: DepsDep, case_id: uuid.UUID) -> Response:
    s = user_of(request)
    case = await _case_or_none(deps, s, case_id)
    return page(request, s, "reported.html", case_id=case_id, case=case)


@router.get("/report/{case_id}/routing")
async def reported_routing(request: Request, deps: DepsDep, case_id: uuid.UUID) -> Response:
    """The 'sent to' list, polled by the result page until the referrals are known."""
    s = user_of(request)
    case = await _case_or_none(deps, s, case_id)
    return page(request, s, "_routing.html", case_id=case_id, case=case)


async def _case_or_none(deps: Deps, s: Session, case_id: uuid.UUID) -> dict | None:
    try:
        return await service.get_case(deps, token=_token(s), case_id=case_id)
    except ApiError:
        return None


# --- coordinator ----------------------------------------------------------------------------------------


@router.get("/coordinator")
async def coordinator_page(request: Request, deps: DepsDep) -> Response:
    s = user_of(request)
    words = Words(s.language)
    claims = _claims(s)
    try:
        items = _with_deadlines(await service.list_referrals(deps, token=_token(s), limit=500), words)
    except ApiError as exc:
        return api_refused(request, s, exc, title=words.t("coordinator_title"))
    figures = None
    if claims.municipality != "*":
        try:
            figures = await service.municipality_figures(deps, token=_token(s),
                                                         municipality=claims.municipality)
        except ApiError:
            figures = None
    open_items = [r for r in items if r["status"] not in ("completed", "closed")]
    return page(request, s, "coordinator.html",
                flagged=[r for r in open_items if r["overdue"] or r["escalated"]],
                unacknowledged=[r for r in open_items if r["status"] == "pending"],
                open_referrals=open_items, figures=figures,
                dashboard_url=_settings(request).api_url("analytics") + "/")
