"""Every route of every service, walked with every agency x role x scope that matters, against
the running apps on the real broker and PostgreSQL, and compared with the answer of the access
policy (shared/access_policy.yaml via shared.access).

- The routes are enumerated from the apps (`app.routes`); a route the policy file has no rule
  for, or that this walk has no probe for, fails a test of its own, naming the route, so a new
  route cannot slip in without a rule.
- Principals: no token (public), and a token of each agency with each role (one role per
  token, so each grant is exercised on its own, including roles the agency may not hold) for
  the resource's own office, another office of the same municipality (the other agencies of
  Prizren), another municipality (Gjakova) and the whole country (`*`).
- The resources: case A (Prizren, reported by Prizren police, referred to the Prizren CSW and
  education directorate, then closed by the coordinator, so writes answer 409 once allowed and
  change nothing), the CSW referral of case A (closed with it), the caller's own inbox.
- A refusal must be exactly the policy's (401 without a token, 403 with one); an allowed call
  must give the route's answer for an allowed caller (200, 201, or the 409/404 of the state).
  A failure lists each route with the principals it answered wrongly.
- The workspace (pages for people, sessions instead of tokens) is walked without a session:
  its public pages answer, every other page sends the visitor to sign in; what a signed-in
  user sees is decided by the APIs above with the user's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable

import asyncpg
import httpx
import pytest
from starlette.routing import Mount

from services.analytics.app import create_app as analytics_app
from services.intake.app import create_app as intake_app
from services.notifications.app import create_app as notifications_app
from services.referral.app import create_app as referral_app
from services.workspace.app import create_app as workspace_app
from shared.access import Decision, Resource, policy
from shared.auth import Claims, mint_token
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.integration.test_notifications_flow import sink_and_settings

pytestmark = pytest.mark.integration

TODAY = date.today().isoformat()
PLACES = ("prizren", "gjakove", "*")
SERVICES = ("intake", "referral", "notifications", "analytics")


def app_routes(app) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of an app, included routers and mounts too (HEAD left out)."""
    out: set[tuple[str, str]] = set()

    def walk(routes) -> None:
        for rt in routes:
            if isinstance(rt, Mount):
                out.add(("GET", rt.path))
            elif hasattr(rt, "effective_candidates"):  # FastAPI's lazily included router
                walk(rt.effective_candidates())
            else:
                out.update((m, rt.path) for m in (getattr(rt, "methods", None) or ()) if m != "HEAD")
    walk(app.routes)
    return out


@dataclass(frozen=True)
class Principal:
    agency: str | None = None  # None: no token
    role: str | None = None
    municipality: str | None = None

    @property
    def claims(self) -> Claims | None:
        if self.agency is None:
            return None
        place = "all" if self.municipality == "*" else self.municipality
        return Claims(sub=f"{self.agency}.{place}.{self.role}", agency=self.agency,
                      municipality=self.municipality, roles=(self.role,))

    def headers(self, settings) -> dict[str, str]:
        c = self.claims
        if c is None:
            return {}
        return {"Authorization": "Bearer " + mint_token(settings, sub=c.sub, agency=c.agency.value,
                                                        municipality=c.municipality, roles=list(c.roles))}

    def __str__(self) -> str:
        return "public" if self.agency is None else f"{self.agency}/{self.municipality}/{self.role}"


def principals() -> list[Principal]:
    p = policy()
    return [Principal()] + [Principal(a, r, m) for a in p.agencies for r in p.roles for m in PLACES]


@dataclass
class Probe:
    """One request to one route, and the policy's answer for a principal."""

    service: str
    method: str
    route: str
    url: str
    expect: Callable[[Claims | None], Decision]
    ok: frozenset[int]  # the answers of an allowed caller
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    stream: bool = False


def actions_decision(claims: Claims | None, actions: list[str], resource: Resource) -> Decision:
    d = Decision(True, "")
    for a in actions:
        d = policy().allowed(claims, a, resource)
        if not d:
            return d
    return d


def reach_decision(claims: Claims | None, action: str) -> Decision:
    """A list route: allowed when the caller is granted the action at any scope."""
    if policy().reach(claims, action) is not None:
        return Decision(True, "")
    return Decision(False, "", status=401 if claims is None else 403)


def probes(case_id: str, referral_id: str, case_resource: Resource, referral_resource: Resource) -> list[Probe]:
    p = policy()
    public = lambda c: Decision(True, "")  # noqa: E731
    out: list[Probe] = []
    for service in SERVICES:
        out += [
            Probe(service, "GET", "/healthz", "/healthz", public, frozenset({200})),
            Probe(service, "GET", "/readyz", "/readyz", public, frozenset({200, 503})),
            Probe(service, "GET", "/openapi.json", "/openapi.json", public, frozenset({200})),
            Probe(service, "GET", "/docs", "/docs", public, frozenset({200})),
            Probe(service, "GET", "/docs/oauth2-redirect", "/docs/oauth2-redirect", public, frozenset({200})),
            Probe(service, "GET", "/redoc", "/redoc", public, frozenset({200})),
            Probe(service, "GET", "/metrics", "/metrics", public, frozenset({404})),  # monitoring port only
        ]
    case_events = {
        "child_withdrawn": {"type": "child_withdrawn", "on": TODAY},
        "school_enrolled": {"type": "school_enrolled", "on": TODAY},
        "updated": {"type": "updated", "school_status": "enrolled_attending"},
        "updated.hazardous": {"type": "updated", "hazardous": True},
        "updated.sector": {"type": "updated", "sector": "agriculture", "activity": "field_work"},
        "closed": {"type": "closed", "on": TODAY, "reason": "resolved"},
    }
    for kind, body in case_events.items():
        changed = [kind.split(".", 1)[1]] if "." in kind else []
        acts = p.case_event_actions(body["type"], changed)
        out.append(Probe("intake", "POST", "/v1/cases/{case_id}/events", f"/v1/cases/{case_id}/events",
                         lambda c, acts=acts: actions_decision(c, acts, case_resource),
                         frozenset({409}), body=body))  # allowed: the case is closed
    out += [
        Probe("intake", "GET", "/v1/cases/{case_id}", f"/v1/cases/{case_id}",
              lambda c: p.allowed(c, "case.read", case_resource), frozenset({200})),
        Probe("intake", "POST", "/v1/identifications", "/v1/identifications",
              lambda c: p.allowed(c, "case.create", Resource(municipality="gjakove")), frozenset({201}),
              body=identification("gjakove")),
        Probe("referral", "GET", "/v1/referrals", "/v1/referrals",
              lambda c: reach_decision(c, "referral.read"), frozenset({200})),
        Probe("referral", "GET", "/v1/referrals/{referral_id}", f"/v1/referrals/{referral_id}",
              lambda c: p.allowed(c, "referral.read", referral_resource), frozenset({200})),
    ]
    for action, body in (("acknowledge", None), ("accept", None), ("decline", {"reason": "not_in_mandate"}),
                         ("complete", {"outcome": "family_visited"})):
        out.append(Probe("referral", "POST", f"/v1/referrals/{{referral_id}}/{action}",
                         f"/v1/referrals/{referral_id}/{action}",
                         lambda c: p.allowed(c, "referral.act", referral_resource),
                         frozenset({409}), body=body))  # allowed: the referral closed with the case
    own = lambda c: p.allowed(c, "inbox.read", Resource(owner=c.sub if c else None))  # noqa: E731
    out += [
        Probe("notifications", "GET", "/v1/inbox", "/v1/inbox", own, frozenset({200})),
        Probe("notifications", "POST", "/v1/inbox/{alert_id}/ack", f"/v1/inbox/{uuid.uuid4()}/ack", own,
              frozenset({404})),  # not an alert of the caller
        Probe("notifications", "GET", "/v1/inbox/stream", "/v1/inbox/stream", own, frozenset({200}), stream=True),
        Probe("notifications", "POST", "/v1/inbox/stream/ticket", "/v1/inbox/stream/ticket", own, frozenset({200})),
    ]
    published = lambda c: p.allowed(c, "analytics.published")  # noqa: E731
    for route, url in (("/v1/counts/municipalities", "/v1/counts/municipalities"),
                       ("/v1/counts/municipalities/{slug}", "/v1/counts/municipalities/prizren"),
                       ("/v1/funnel", "/v1/funnel"),
                       ("/v1/export/municipalities.csv", "/v1/export/municipalities.csv"),
                       ("/v1/export/municipalities/{slug}.csv", "/v1/export/municipalities/prizren.csv"),
                       ("/v1/export/funnel.csv", "/v1/export/funnel.csv"),
                       ("/", "/"), ("/static", "/static/style.css")):
        out.append(Probe("analytics", "GET", route, url, published, frozenset({200})))
    out.append(Probe("analytics", "GET", "/v1/stream", "/v1/stream", published, frozenset({200}), stream=True))
    out.append(Probe("analytics", "POST", "/v1/stream/ticket", "/v1/stream/ticket",
                     lambda c: p.allowed(c, "analytics.stream_ticket", Resource(owner=c.sub if c else None)),
                     frozenset({200})))
    for municipality in (None, "prizren"):
        out.append(Probe("analytics", "GET", "/v1/time-to-acknowledge", "/v1/time-to-acknowledge",
                         lambda c, m=municipality: p.allowed(c, "analytics.exact", Resource(municipality=m)),
                         frozenset({200}), params={"municipality": municipality} if municipality else {}))
    return out


def identification(municipality: str) -> dict:
    return {
        "municipality": municipality, "identified_on": TODAY, "report_source": "officer",
        "child": {"given_name": "Lule", "family_name": "Gashi", "date_of_birth": "2012-02-02", "sex": "female",
                  "community": "albanian", "school_status": "enrolled_irregular"},
        "work": {"sector": "street_work", "activity": "street_vending", "hazardous": False,
                 "employer_involved": False},
    }


async def first_status(app, method: str, url: str, headers: dict[str, str], params: dict[str, str]) -> int:
    """The status line of a streaming response (SSE), then disconnect: the app itself, in process."""
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and not started.done():
            started.set_result(message["status"])

    query = str(httpx.QueryParams(params)).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": url, "raw_path": url.encode(), "query_string": query, "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("test", 80)}
    task = asyncio.create_task(app(scope, receive, send))
    try:
        return await asyncio.wait_for(asyncio.shield(started), 20)
    finally:
        gone.set()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def service_apps(settings, notifications_settings=None) -> dict[str, Any]:
    """The four services' apps, not started (`create_app` does no I/O)."""
    return {"intake": intake_app(settings), "referral": referral_app(settings),
            "notifications": notifications_app(notifications_settings or settings),
            "analytics": analytics_app(settings)}


async def test_every_route_of_the_services_and_the_workspace_has_a_rule_in_the_policy(env):
    p = policy()
    apps = {**service_apps(env), "workspace": workspace_app(env)}
    missing = [f"{name}: {m} {path}" for name, app in apps.items()
               for m, path in sorted(app_routes(app)) if p.route_actions(name, m, path) is None]
    assert not missing, "routes without a rule in shared/access_policy.yaml: " + "; ".join(missing)


async def test_every_route_of_the_services_has_a_probe_in_the_walk(env):
    case_resource = referral_resource = Resource(municipality="prizren")
    probed = {(t.service, t.method, t.route)
              for t in probes(str(uuid.uuid4()), str(uuid.uuid4()), case_resource, referral_resource)}
    missing = [f"{name}: {m} {path}" for name, app in service_apps(env).items()
               for m, path in sorted(app_routes(app)) if (name, m, path) not in probed]
    assert not missing, "routes with a rule but no probe in this walk (add one to `probes`): " + "; ".join(missing)


async def test_every_route_answers_what_the_policy_says_for_every_agency_role_and_scope(env):
    async with contextlib.AsyncExitStack() as stack:
        _, nsettings = await stack.enter_async_context(sink_and_settings(env))
        apps = service_apps(env, nsettings)
        clients = {name: await stack.enter_async_context(running(app)) for name, app in apps.items()}
        conn = await asyncpg.connect(env.database_url)
        stack.push_async_callback(conn.close)
        case_id, referral_id = await closed_case_a(env, clients, conn)
        await wait_until(_ready(clients["analytics"]), timeout_s=90, what="analytics to be ready")

        case_resource = Resource(municipality="prizren", offices=frozenset(
            {("police", "prizren"), ("csw", "prizren"), ("education", "prizren")}),
            facts={"worst_form": False, "open_referral_agencies": []})
        referral_resource = Resource(municipality="prizren", offices=frozenset({("csw", "prizren")}))
        table = probes(case_id, referral_id, case_resource, referral_resource)
        everyone = principals()
        wrong: dict[str, list[str]] = {}  # route -> the principals it answered wrongly, and how
        counts = {"allowed": 0, "refused": 0}
        gate = asyncio.Semaphore(8)

        async def one(probe: Probe, who: Principal) -> None:
            expected = probe.expect(who.claims)
            headers = who.headers(env)
            async with gate:
                if probe.stream:
                    status = await first_status(apps[probe.service], probe.method, probe.url, headers, probe.params)
                else:
                    r = await clients[probe.service].request(probe.method, probe.url, headers=headers,
                                                             json=probe.body, params=probe.params)
                    status = r.status_code
            counts["allowed" if expected.allowed else "refused"] += 1
            if expected.allowed and status not in probe.ok:
                why = f"the policy allows ({expected.reason}), got {status}"
            elif not expected.allowed and status != expected.status:
                why = f"the policy says {expected.status} ({expected.reason}), got {status}"
            else:
                return
            route = f"{probe.service} {probe.method} {probe.route} {probe.body or ''}{probe.params or ''}".rstrip()
            wrong.setdefault(route, []).append(f"{who}: {why}")

        await asyncio.gather(*(one(probe, who) for probe in table for who in everyone))
    assert not wrong, (f"{sum(map(len, wrong.values()))} answers on {len(wrong)} routes differ from the policy:\n"
                       + "\n".join(f"{route}\n  " + "\n  ".join(sorted(whos)[:10])
                                   + (f"\n  ... and {len(whos) - 10} more" if len(whos) > 10 else "")
                                   for route, whos in sorted(wrong.items())))
    print(f"[access walk] {len(table)} probes x {len(everyone)} principals: "
          f"{counts['allowed']} allowed, {counts['refused']} refused, as the policy says")
    assert counts["allowed"] > 0 and counts["refused"] > 0


async def closed_case_a(env, clients: dict[str, httpx.AsyncClient], conn: asyncpg.Connection) -> tuple[str, str]:
    """Case A: Prizren police report it, CSW and education get referrals, then the coordinator
    closes it and its referrals close with it. Returns the case id and the CSW referral's id."""
    police = bearer(env, sub="police.prizren.duty", agency="police", municipality="prizren",
                    roles=["reporter", "caseworker"])
    r = await clients["intake"].post("/v1/identifications", json=identification("prizren"), headers=police)
    assert r.status_code == 201, r.text
    case_id = r.json()["case_id"]

    async def holders():
        rows = await conn.fetch("select agency from intake.case_access where case_id = $1", uuid.UUID(case_id))
        return {r["agency"] for r in rows} >= {"csw", "education"} or None
    await wait_until(holders, timeout_s=60, what="intake to learn the csw and education referrals")
    coordinator = bearer(env, sub="coordinator.prizren", agency="coordinator", municipality="prizren",
                         roles=["coordinator"])
    r = await clients["intake"].post(f"/v1/cases/{case_id}/events", headers=coordinator,
                                     json={"type": "closed", "on": TODAY, "reason": "resolved"})
    assert r.status_code == 201, r.text
    referral_id = await conn.fetchval("select referral_id from referral.referral where case_id = $1 "
                                      "and agency = 'csw'", uuid.UUID(case_id))

    async def referrals_closed():
        n = await conn.fetchval("select count(*) from referral.referral where case_id = $1 "
                                "and status <> 'closed'", uuid.UUID(case_id))
        return n == 0
    await wait_until(referrals_closed, timeout_s=60, what="the referrals to close with the case")
    return case_id, str(referral_id)


def workspace_walk(env) -> list[tuple[str, str, str, bool]]:
    """(method, route, url, public) of every workspace route, with made-up ids: without a
    session no page gets as far as reading a case."""
    p = policy()
    out = []
    for m, path in sorted(app_routes(workspace_app(env))):
        actions = p.route_actions("workspace", m, path) or p.route_actions("every_service", m, path)
        url = (path.replace("{case_id}", str(uuid.uuid4())).replace("{referral_id}", str(uuid.uuid4()))
               .replace("{alert_id}", str(uuid.uuid4())).replace("{action}", "acknowledge"))
        if path == "/static":
            url = "/static/style.css"
        out.append((m, path, url, all(p.allowed(None, a) for a in actions)))
    return out


def to_signin(r: httpx.Response) -> bool:
    return r.status_code in (302, 303, 307) and r.headers.get("location", "").startswith("/signin")


async def test_the_workspaces_public_pages_answer_without_a_session(env):
    wrong = []
    async with running(workspace_app(env)) as ws:
        for m, path, url, public in workspace_walk(env):
            if not public:
                continue
            r = await ws.request(m, url, follow_redirects=False)
            # reached without a session (`/` itself sends a visitor without one to sign in; the
            # sign-in forms' own CSRF and OIDC-state checks refuse a forged request with 403)
            if not (r.status_code < 500 and (path == "/" or not to_signin(r))):
                wrong.append(f"workspace {m} {path} ({url}) without a session: got {r.status_code} "
                             f"{r.headers.get('location', '')}".rstrip())
    assert not wrong, "public workspace pages that do not answer without a session:\n" + "\n".join(wrong)


async def test_the_workspaces_other_pages_send_a_visitor_without_a_session_to_sign_in(env):
    wrong, checked = [], 0
    async with running(workspace_app(env)) as ws:
        for m, path, url, public in workspace_walk(env):
            if public:
                continue
            checked += 1
            r = await ws.request(m, url, follow_redirects=False)
            # to the sign-in page, a refusal, or (the live inbox) 204: EventSource stops, no data
            empty = r.status_code == 204 and not r.content
            if not (to_signin(r) or empty or r.status_code in (401, 403)):
                wrong.append(f"workspace {m} {path} ({url}): answered {r.status_code} without a session")
    assert not wrong, "workspace pages open without a session:\n" + "\n".join(wrong)
    assert checked > 0, "no workspace page needs a session: the walk found none"


def _ready(client: httpx.AsyncClient):
    async def check() -> bool:
        return (await client.get("/readyz")).status_code == 200
    return check
