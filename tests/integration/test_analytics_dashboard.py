"""The dashboard in a real headless Chromium (Debian's `chromium` package, driven over the
DevTools protocol; no browser download, no extra Python package): the map shows 38
municipalities, and a new identification changes the count on screen without a reload.
A screenshot is saved to tests/artifacts/analytics-dashboard.png."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
import websockets

from services.analytics.app import create_app
from shared.kafka import make_producer, send_envelope
from shared.topics import Topics
from tests import builders
from tests.apps import running
from tests.infra import wait_until
from tests.integration.test_analytics_live import served
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """The few DevTools protocol calls the test needs."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")


@contextlib.asynccontextmanager
async def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("Debian's chromium package is not installed (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="clms-chromium-"))
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1280,1400", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        await wait_until(lambda: port_file.exists() and port_file.read_text().strip(), timeout_s=30,
                         what="chromium to open its DevTools port")
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with websockets.connect(url, max_size=50_000_000) as ws:
            yield Page(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def _is(value, expected) -> bool:
    return await value == expected


async def test_dashboard_in_chromium_shows_the_map_and_a_live_count_change(env):
    topics = Topics(env.topic_prefix)
    first = [builders.envelope(builders.case_identified(municipality=m))
             for m in ["prizren"] * 5 + ["prishtine"] * 10]
    await produce(env, topics.case_events, [(e.key, e.to_json_bytes()) for e in first])
    # the public page shows the published snapshot: every second here (daily in production)
    app = create_app(env.model_copy(update={"analytics_publish_every_s": 1.0, "analytics_publish_lag_s": 0.0}))
    async with running(app), served(app) as base, browser() as page:
        await wait_until(lambda: sum(n for k, n in app.state.deps.aggregate.counts.items()
                                     if k[:2] == ("id", "prizren") and k[3] == "total") == 5,
                         timeout_s=45, what="the first identifications to be counted")
        await page.call("Page.enable")
        await page.call("Page.navigate", url=base + "/")

        async def cell(slug: str):
            return await page.eval(
                f"(document.querySelector('#row-{slug} [data-field=identified]') || {{}}).textContent")

        async def map_ready():
            return await page.eval("document.querySelectorAll('#map path.municipality').length") == 38

        await wait_until(map_ready, timeout_s=20, what="38 municipalities drawn on the map")
        # five children in prizren: published as "c" (1 to 5 are suppressed); ten in prishtine: 10
        await wait_until(lambda: _is(cell("prizren"), "c"), timeout_s=10,
                         what="the table to show the published snapshot")
        assert await cell("decan") == "0"
        assert "CC BY-SA 2.0" in await page.eval("document.getElementById('attribution').textContent")
        assert await page.eval("document.querySelector('#map path[data-slug=prizren]').getAttribute('fill')") \
            not in ("#ffffff", "#eef1f4")
        navigations = await page.eval("performance.getEntriesByType('navigation').length")

        # an identification in gjilan and one in prizren: the page changes without a reload
        producer = make_producer(env)
        await producer.start()
        try:
            for muni in ("prizren", "gjilan"):
                await send_envelope(producer, topics.case_events,
                                    builders.envelope(builders.case_identified(municipality=muni)))
        finally:
            await producer.stop()

        async def updated():
            # six in prizren are published rounded to 5; one in gjilan as "c" (national 17 -> 15:
            # gjilan = 13..17 - prizren 6..7 - prishtine 8..12 leaves 0..3)
            return await cell("prizren") == "5" and await cell("gjilan") == "c"

        await wait_until(updated, timeout_s=10, what="the dashboard to show the new counts")
        assert await page.eval("performance.getEntriesByType('navigation').length") == navigations
        assert await page.eval("document.getElementById('status').dataset.state") == "live"
        bar = "document.querySelector('#funnel [data-stage=identified] .fill').getBoundingClientRect().width"
        await wait_until(lambda: page.eval(bar), timeout_s=5, what="the funnel's identified bar to be drawn")
        await asyncio.sleep(1.5)  # let the bar and colour transitions finish for the screenshot
        shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "analytics-dashboard.png").write_bytes(base64.b64decode(shot["data"]))
