"""The workspace in a real Chromium, over the whole system started as `make run` starts it
(embedded broker and PostgreSQL, the SMTP sink, five services as separate processes):

the CSW duty officer of Prizren has the inbox open; a police officer of Prizren, on a phone-sized
screen, reports a 12-year-old collecting scrap metal through the form (first with mistakes, which
come back next to their fields); the alert appears in the CSW inbox without a reload; the officer
opens the referral from the link in the e-mail the SMTP sink received, acknowledges and accepts;
the coordinator of Prizren sees the case, and that education has not acknowledged; the case page
shows the child's name to the CSW officer (who records that the child was withdrawn from work)
and refuses the education officer of Gjakova; the CSW officer switches to Serbian. Every
page passes axe-core with no serious or critical violation and is photographed at 360 and 1280 px
into tests/artifacts/workspace/.

Needs Debian's `chromium` (or CLMS_CHROMIUM); skipped with the reason when there is none.
"""

from __future__ import annotations

import re
import sys
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


async def test_report_alert_act_coordinate_and_read_the_case_in_the_browser(system, browser):
    ws = system.url("workspace")
    a11y: dict[str, list[str]] = {}

    # --- sign-in page; the CSW duty officer of Prizren opens the inbox and waits -------------------------
    csw_ctx, csw = await sign_in(browser, ws, "csw.prizren.duty")
    anonymous = await browser.new_page(locale="en-GB")
    await anonymous.goto(f"{ws}/signin")
    await check_page(anonymous, "signin", a11y)
    await anonymous.close()

    await expect(csw).to_have_url(f"{ws}/inbox")
    await expect(csw.locator("#live-status")).to_contain_text("Connected")  # the relayed SSE stream is up
    await csw.evaluate("window.__sameDocument = 'yes'")  # gone if the page reloads
    cookies = await csw_ctx.cookies()
    session = next(c for c in cookies if c["name"] == "clms_ws")
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    assert "eyJ" not in await csw.content(), "no token (a JWT starts with eyJ) may reach the page"

    # --- a police officer on a phone reports the child ---------------------------------------------------
    police_ctx, police = await sign_in(browser, ws, "police.prizren.duty", width=360)
    await police.get_by_role("link", name="Report a child").click()
    await expect(police.get_by_role("heading", level=1)).to_have_text("Report a child")
    await police.keyboard.press("Tab")
    assert await police.evaluate("document.activeElement.className") == "skip", "the first Tab stop skips to the content"
    await check_page(police, "report", a11y)

    # nothing filled in: each required field says so next to itself
    await police.get_by_role("button", name="Send the report").click()
    given = police.get_by_label("Given name")
    await expect(given).to_have_attribute("aria-invalid", "true")
    await expect(police.locator("#err-child-given_name")).to_have_text("This field is required.")
    await expect(police.locator("#err-child-date_of_birth")).to_contain_text("date of birth or the estimated age")

    await given.fill(GIVEN)
    await police.get_by_label("Family name").fill(FAMILY)
    await police.get_by_label("Date of birth").fill(DOB)
    await police.get_by_label("Sex").select_option("female")
    await police.get_by_label("Community").select_option("roma")
    await police.get_by_label("Schooling").select_option("dropped_out")
    await police.get_by_label("Guardian's name").fill("Mirlindatest Xhemajlitestaj")
    await police.get_by_label("Relationship to the child").select_option("mother")
    await police.get_by_label("Phone").fill("call me")  # intake refuses it: the 422 comes back here
    await police.get_by_label("Activity").select_option("scrap_metal_waste:scrap_collection")
    await police.get_by_label("Hazardous work").check()
    await police.get_by_label("Notes").fill("Seen with a cart near the Lumbardhi bridge")
    await police.get_by_role("button", name="Send the report").click()
    phone_error = police.locator("#err-child-guardian-phone")
    await expect(phone_error).to_contain_text("Use digits, spaces")
    await expect(police.get_by_label("Phone")).to_have_attribute("aria-describedby", "err-child-guardian-phone")
    await expect(police.get_by_label("Given name")).to_have_value(GIVEN)  # the form is kept
    await check_page(police, "report-errors", a11y)

    await police.get_by_label("Phone").fill("+383 44 987 654")
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

    # --- the alert appears in the CSW inbox without a reload ----------------------------------------------
    alert = csw.locator("#alerts li", has_text=case_id)
    await expect(alert).to_have_count(1, timeout=30_000)
    await expect(alert).to_contain_text("New referral")
    await expect(csw.locator("#inbox-empty")).to_be_hidden()
    assert await csw.evaluate("window.__sameDocument") == "yes", "the alert came live, not by reloading"
    await check_page(csw, "inbox", a11y)

    # --- ... and the e-mail links to the referral's page ------------------------------------------------
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

    # --- the coordinator sees it, and who has not acknowledged ----------------------------------------------
    coord_ctx, coord = await sign_in(browser, ws, "coordinator.prizren")
    await expect(coord).to_have_url(f"{ws}/coordinator")
    unacked = coord.locator("section", has=coord.get_by_role("heading", name="Not acknowledged yet"))
    await expect(unacked.locator("tr", has_text=case_id)).to_contain_text("Municipal Education Directorate Prizren")
    everything = coord.locator("section", has=coord.get_by_role("heading", name="All open referrals"))
    await expect(everything.locator("tr", has_text="Centre for Social Work Prizren")).to_contain_text("accepted")
    await expect(coord.get_by_role("link", name="Open the analytics dashboard")).to_have_attribute(
        "href", f"{system.url('analytics')}/")
    await check_page(coord, "coordinator", a11y)

    # --- the case: the CSW officer reads the child's name; education of Gjakova may not ------------------------
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

    # --- the language is the user's choice, and kept -----------------------------------------------------------
    await csw.get_by_label("Language").select_option("sr")
    await csw.get_by_role("button", name="Change language").click()
    await expect(csw.locator("html")).to_have_attribute("lang", "sr-Latn")
    await expect(csw.get_by_role("link", name="Prijemno sanduče")).to_be_visible()
    await csw.goto(f"{ws}/referrals")
    await expect(csw.get_by_role("heading", level=1)).to_have_text("Upućivanja kancelarije")
    await check_page(csw, "referrals-sr", a11y)

    for ctx in (csw_ctx, police_ctx, coord_ctx, edu_ctx):
        await ctx.close()
    assert not a11y, "axe-core found serious or critical violations:\n" + "\n".join(
        f"{page}: {line}" for page, lines in a11y.items() for line in lines)
