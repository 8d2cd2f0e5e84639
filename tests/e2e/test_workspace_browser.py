"""The workspace in a real Chromium, over the whole system started as `make run` starts it
(embedded broker and PostgreSQL, the SMTP sink, five services as separate processes), one
behaviour a test, each on a case of its own (the system and the browser are shared; no test
needs another to have run):

a police officer of Prizren, on a phone-sized screen, reports a 12-year-old collecting scrap
metal through the form (mistakes come back next to their fields; the report is routed; the same
form sent again gives the same case); the alert appears in the CSW duty officer's open inbox
without a reload, and the link in the e-mail the SMTP sink received leads to the referral, which
the officer acknowledges and accepts; the coordinator of Prizren sees the case, and that
education has not acknowledged; the case page shows the child's name to the CSW officer (who
records that the child was withdrawn from work) and refuses the education officer of Gjakova; an
officer switches to Serbian. Every page passes axe-core with no serious or critical violation
and is photographed at 360 and 1280 px into tests/artifacts/workspace/.

Needs Debian's `chromium` (or CLMS_CHROMIUM); skipped with the reason when there is none.
"""

from __future__ import annotations

import re
import sys
import uuid
from datetime import date, timedelta

import httpx
import pytest

from tests.e2e.browser import check_page, chromium_path, launch_args
from tests.e2e.harness import running_system
from tests.infra import wait_until

CHROMIUM = chromium_path()
if CHROMIUM is None:
    REASON = ("no Chromium: install Debian's `chromium` package (apt-get install -y chromium) or set "
              "CLMS_CHROMIUM to a Chromium binary to run the workspace browser test")
    print(f"SKIPPED tests/e2e/test_workspace_browser.py: {REASON}", file=sys.stderr)
    pytest.skip(REASON, allow_module_level=True)

pytest.importorskip("playwright.async_api", reason="the `playwright` package is missing: `make venv` installs the test extras")
from playwright.async_api import async_playwright, expect  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

GIVEN, FAMILY = "Qendresa", "Xhemajlitestaj"
DOB = (date.today() - timedelta(days=12 * 365 + 100)).isoformat()
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(scope="module")
async def system(tmp_path_factory):
    async with running_system(tmp_path_factory.mktemp("ws")) as s:
        yield s


@pytest.fixture(scope="module")
async def browser():
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=launch_args())
        try:
            yield b
        finally:
            await b.close()


async def sign_in(browser, ws: str, sub: str, *, width: int = 1280):
    """A fresh browser context (its own cookies) signed in as a seeded development officer."""
    context = await browser.new_context(viewport={"width": width, "height": 800}, locale="en-GB")
    page = await context.new_page()
    municipality = sub.split(".")[1]
    await page.goto(f"{ws}/signin?municipality={municipality}")
    await page.get_by_role("button", name=re.compile(re.escape(sub))).click()
    await expect(page.locator("header .sub")).to_have_text(sub)
    return context, page


def no_violations(a11y: dict[str, list[str]]) -> None:
    assert not a11y, "axe-core found serious or critical violations:\n" + "\n".join(
        f"{page}: {line}" for page, lines in a11y.items() for line in lines)


async def reported_case(system) -> str:
    """A case reported through the intake API by the police of Prizren, routed to CSW and
    education (the form itself is the subject of the report tests)."""
    police = system.headers(sub="police.prizren.duty", agency="police", municipality="prizren", roles=["reporter"])
    body = {"municipality": "prizren", "identified_on": date.today().isoformat(), "report_source": "officer",
            "child": {"given_name": GIVEN, "family_name": FAMILY, "date_of_birth": DOB, "sex": "female",
                      "community": "roma", "school_status": "dropped_out",
                      "guardian": {"name": "Mirlindatest Xhemajlitestaj", "relationship": "mother",
                                   "phone": "+383 44 987 654"}},
            "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection", "hazardous": True,
                     "employer_involved": False}}
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{system.url('intake')}/v1/identifications", json=body,
                              headers={**police, "Idempotency-Key": str(uuid.uuid4())})
        assert r.status_code == 201, r.text
        case_id = r.json()["case_id"]
        await referrals_of(system, case_id, count=2)
    return case_id


async def referrals_of(system, case_id: str, *, count: int = 2) -> dict[str, dict]:
    """The case's referrals by agency, once `count` of them are open."""
    coordinator = system.headers(sub="coordinator.prizren", agency="coordinator", municipality="prizren",
                                 roles=["coordinator"])

    async def routed():
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(f"{system.url('referral')}/v1/referrals", params={"case_id": case_id},
                                 headers=coordinator)
        items = r.json()["items"] if r.status_code == 200 else []
        return {i["agency"]: i for i in items} if len(items) >= count else None
    return await wait_until(routed, timeout_s=30, what=f"{count} referrals of case {case_id}")


async def fill_report(page, *, phone: str) -> None:
    await page.get_by_label("Given name").fill(GIVEN)
    await page.get_by_label("Family name").fill(FAMILY)
    await page.get_by_label("Date of birth").fill(DOB)
    await page.get_by_label("Sex").select_option("female")
    await page.get_by_label("Community").select_option("roma")
    await page.get_by_label("Schooling").select_option("dropped_out")
    await page.get_by_label("Guardian's name").fill("Mirlindatest Xhemajlitestaj")
    await page.get_by_label("Relationship to the child").select_option("mother")
    await page.get_by_label("Phone").fill(phone)
    await page.get_by_label("Activity").select_option("scrap_metal_waste:scrap_collection")
    await page.get_by_label("Hazardous work").check()
    await page.get_by_label("Notes").fill("Seen with a cart near the Lumbardhi bridge")


async def report_page_on_a_phone(browser, ws: str):
    ctx, police = await sign_in(browser, ws, "police.prizren.duty", width=360)
    await police.get_by_role("link", name="Report a child").click()
    await expect(police.get_by_role("heading", level=1)).to_have_text("Report a child")
    return ctx, police


async def test_the_sign_in_page_and_a_session_that_keeps_the_token_on_the_server(system, browser):
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}
    anonymous = await browser.new_page(locale="en-GB")
    await anonymous.goto(f"{ws}/signin")
    await check_page(anonymous, "signin", a11y)
    await anonymous.close()

    csw_ctx, csw = await sign_in(browser, ws, "csw.prizren.duty")
    await expect(csw).to_have_url(f"{ws}/inbox")
    await expect(csw.locator("#live-status")).to_contain_text("Connected")  # the relayed SSE stream is up
    session = next(c for c in await csw_ctx.cookies() if c["name"] == "clms_ws")
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    assert "eyJ" not in await csw.content(), "no token (a JWT starts with eyJ) may reach the page"
    await csw_ctx.close()
    no_violations(a11y)


async def test_a_report_with_mistakes_comes_back_next_to_its_fields_on_a_phone(system, browser):
    a11y: dict[str, list[str]] = {}
    ctx, police = await report_page_on_a_phone(browser, system.url("workspace"))
    await police.keyboard.press("Tab")
    assert await police.evaluate("document.activeElement.className") == "skip", "the first Tab stop skips to the content"
    await check_page(police, "report", a11y)

    # nothing filled in: each required field says so next to itself
    await police.get_by_role("button", name="Send the report").click()
    await expect(police.get_by_label("Given name")).to_have_attribute("aria-invalid", "true")
    await expect(police.locator("#err-child-given_name")).to_have_text("This field is required.")
    await expect(police.locator("#err-child-date_of_birth")).to_contain_text("date of birth or the estimated age")

    await fill_report(police, phone="call me")  # intake refuses it: the 422 comes back here
    await police.get_by_role("button", name="Send the report").click()
    await expect(police.locator("#err-child-guardian-phone")).to_contain_text("Use digits, spaces")
    await expect(police.get_by_label("Phone")).to_have_attribute("aria-describedby", "err-child-guardian-phone")
    await expect(police.get_by_label("Given name")).to_have_value(GIVEN)  # the form is kept
    await check_page(police, "report-errors", a11y)
    await ctx.close()
    no_violations(a11y)


async def test_a_report_is_routed_and_the_same_form_sent_again_gives_the_same_case(system, browser):
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}
    ctx, police = await report_page_on_a_phone(browser, ws)
    await fill_report(police, phone="+383 44 987 654")
    key = await police.locator("input[name=idempotency_key]").input_value()
    form = {  # what the browser posts, to send it a second time below
        el["name"]: el["value"] for el in await police.eval_on_selector_all(
            "form[action='/report'] [name]",
            "els => els.filter(e => e.type !== 'checkbox' || e.checked).map(e => ({name: e.name, value: e.value}))")
    }
    await police.get_by_role("button", name="Send the report").click()
    await expect(police).to_have_url(re.compile(rf"{re.escape(ws)}/report/{UUID}$"))
    case_id = police.url.rsplit("/", 1)[1]
    await expect(police.locator("#case-number")).to_have_text(case_id)
    sent_to = police.locator("ul.sent-to")
    await expect(sent_to).to_contain_text("Centre for Social Work Prizren", timeout=30_000)
    await expect(sent_to).to_contain_text("Municipal Education Directorate Prizren")
    await check_page(police, "reported", a11y)

    # a retry of the same form (same Idempotency-Key) answers with the same case, never a second one
    assert form["idempotency_key"] == key
    again = await police.request.post(f"{ws}/report", form=form, max_redirects=0)
    assert again.status == 303 and again.headers["location"] == f"/report/{case_id}", again.status
    await ctx.close()
    no_violations(a11y)


async def test_the_alert_appears_live_and_its_email_leads_to_the_referral_to_acknowledge_and_accept(system, browser):
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}
    csw_ctx, csw = await sign_in(browser, ws, "csw.prizren.duty")
    await expect(csw.locator("#live-status")).to_contain_text("Connected")
    await csw.evaluate("window.__sameDocument = 'yes'")  # gone if the page reloads
    case_id = await reported_case(system)

    alert = csw.locator("#alerts li", has_text=case_id)
    await expect(alert).to_have_count(1, timeout=30_000)
    await expect(alert).to_contain_text("New referral")
    await expect(csw.locator("#inbox-empty")).to_be_hidden()
    assert await csw.evaluate("window.__sameDocument") == "yes", "the alert came live, not by reloading"
    await check_page(csw, "inbox", a11y)

    async def mail():
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"{system.mail_url}/messages")
        return [m for m in r.json() if m["recipient"] == "csw.prizren.duty" and case_id in m["body"]]
    mails = await wait_until(mail, timeout_s=30, what="the alert e-mail to csw.prizren.duty")
    assert GIVEN not in mails[0]["body"] and FAMILY not in mails[0]["body"]
    link = re.search(rf"{re.escape(ws)}/referrals/{UUID}", mails[0]["body"])
    assert link, f"no workspace referral link in the e-mail:\n{mails[0]['body']}"

    await csw.goto(link.group(0))
    await expect(csw.get_by_role("heading", level=1)).to_contain_text("Centre for Social Work Prizren")
    await expect(csw.locator("#referral-status")).to_have_text("pending")
    await check_page(csw, "referral", a11y)
    await csw.get_by_role("button", name="Acknowledge").click()
    await expect(csw.get_by_role("status")).to_have_text("Acknowledged.")
    await expect(csw.locator("#referral-status")).to_have_text("acknowledged")
    await csw.get_by_role("button", name="Accept").click()
    await expect(csw.locator("#referral-status")).to_have_text("accepted")
    await expect(csw.get_by_role("button", name="Complete")).to_be_visible()

    await csw.get_by_role("link", name="Referrals", exact=True).click()
    await expect(csw.locator("table")).to_contain_text(case_id)
    await check_page(csw, "referrals", a11y)
    await csw_ctx.close()
    no_violations(a11y)


async def test_the_coordinator_sees_the_case_and_who_has_not_acknowledged(system, browser):
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}
    case_id = await reported_case(system)
    csw_api = system.headers(sub="csw.prizren.duty", agency="csw", municipality="prizren", roles=["duty_officer"])
    rid = (await referrals_of(system, case_id))["csw"]["referral_id"]
    async with httpx.AsyncClient(timeout=10) as client:
        for action in ("acknowledge", "accept"):
            r = await client.post(f"{system.url('referral')}/v1/referrals/{rid}/{action}", headers=csw_api)
            assert r.status_code == 200, r.text

    coord_ctx, coord = await sign_in(browser, ws, "coordinator.prizren")
    await expect(coord).to_have_url(f"{ws}/coordinator")
    unacked = coord.locator("section", has=coord.get_by_role("heading", name="Not acknowledged yet"))
    await expect(unacked.locator("tr", has_text=case_id)).to_contain_text("Municipal Education Directorate Prizren")
    everything = coord.locator("section", has=coord.get_by_role("heading", name="All open referrals"))
    csw_row = everything.locator("tr", has_text=case_id).filter(has_text="Centre for Social Work Prizren")
    await expect(csw_row).to_contain_text("accepted")
    await expect(coord.get_by_role("link", name="Open the analytics dashboard")).to_have_attribute(
        "href", f"{system.url('analytics')}/")
    await check_page(coord, "coordinator", a11y)
    await coord_ctx.close()
    no_violations(a11y)


async def test_the_case_page_shows_the_child_to_csw_and_refuses_education_of_gjakova(system, browser):
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}
    case_id = await reported_case(system)
    csw_ctx, csw = await sign_in(browser, ws, "csw.prizren.duty")
    await csw.goto(f"{ws}/cases/{case_id}")
    await expect(csw.locator("#child-name")).to_have_text(f"{GIVEN} {FAMILY}")
    await check_page(csw, "case", a11y)
    # a follow-up: the child was withdrawn from work (intake records it; the history shows it)
    await csw.get_by_label("Event").select_option("child_withdrawn")
    await csw.get_by_role("button", name="Record").click()
    await expect(csw.get_by_role("status")).to_have_text("Recorded.")
    await expect(csw.locator("ol.history")).to_contain_text("child withdrawn from work")

    edu_ctx, edu = await sign_in(browser, ws, "education.gjakove.duty")
    response = await edu.goto(f"{ws}/cases/{case_id}")
    assert response is not None and response.status == 403
    await expect(edu.get_by_role("alert")).to_contain_text("You may not do this")
    assert GIVEN not in await edu.content() and FAMILY not in await edu.content()
    await check_page(edu, "case-refused", a11y)
    for ctx in (csw_ctx, edu_ctx):
        await ctx.close()
    no_violations(a11y)


async def test_the_language_is_the_users_choice(system, browser):
    """An officer of its own (the choice is kept per user across sign-ins: the other tests'
    officers keep English)."""
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}
    ctx, sup = await sign_in(browser, ws, "csw.prizren.supervisor")
    await sup.get_by_label("Language").select_option("sr")
    await sup.get_by_role("button", name="Change language").click()
    await expect(sup.locator("html")).to_have_attribute("lang", "sr-Latn")
    await expect(sup.get_by_role("link", name="Prijemno sanduče")).to_be_visible()
    await sup.goto(f"{ws}/referrals")
    await expect(sup.get_by_role("heading", level=1)).to_have_text("Upućivanja kancelarije")
    await check_page(sup, "referrals-sr", a11y)
    await ctx.close()
    no_violations(a11y)
