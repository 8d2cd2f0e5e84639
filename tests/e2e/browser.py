"""A real browser for the workspace tests: Debian's chromium driven by Playwright (never
`playwright install`, which downloads a browser), axe-core for accessibility, screenshots at a
phone's and a desktop's width into tests/artifacts/workspace/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "workspace"
# axe-core 4.14.1 (MPL-2.0, Deque Systems), axe.min.js from the npm package `axe-core`, unchanged.
AXE_JS = Path(__file__).parent / "vendor" / "axe.min.js"
WIDTHS = (360, 1280)


def chromium_path() -> str | None:
    """CLMS_CHROMIUM, else `chromium` on PATH (Debian's package), else None."""
    given = os.environ.get("CLMS_CHROMIUM")
    if given:
        return given if Path(given).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def launch_args() -> list[str]:
    # Chromium's sandbox refuses to run as root (CI containers); the pages are our own.
    return ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


async def axe_violations(page, *, impacts: tuple[str, ...] = ("serious", "critical")) -> list[str]:
    """Run axe-core on the page as it is; one line per serious or critical violation. The script
    is evaluated through the DevTools protocol, so the page's Content-Security-Policy stays on."""
    if not await page.evaluate("() => typeof window.axe !== 'undefined'"):
        await page.evaluate(AXE_JS.read_text(encoding="utf-8"))
    found = await page.evaluate(
        """async (impacts) => {
            const r = await axe.run(document, {resultTypes: ['violations']});
            return r.violations.filter(v => impacts.includes(v.impact)).map(v =>
                `${v.impact} ${v.id}: ${v.help} (${v.nodes.length}x, e.g. ${v.nodes[0].target.join(' ')})`);
        }""",
        list(impacts),
    )
    return list(found)


async def check_page(page, name: str, report: dict[str, list[str]]) -> None:
    """Accessibility (axe-core) at both widths and a full-page screenshot at each."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    try:
        for width in WIDTHS:
            await page.set_viewport_size({"width": width, "height": 800})
            problems = await axe_violations(page)
            if problems:
                report[f"{name} @ {width}px"] = problems
            await page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
    finally:
        if size:
            await page.set_viewport_size(size)
