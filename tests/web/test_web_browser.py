"""The report page in a real browser: Debian's headless Chromium driven by Playwright, the app served
by uvicorn on a socket, real traffic behind it (real Redis, the Stripe stand-in).

Screenshots are saved under ``test-artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dualwrite.config import Settings
from dualwrite.engine import DualWriteEngine
from dualwrite.testing import serve_app
from dualwrite.web import report_app
from tests.conftest import STRIPE_KEY
from tests.support import ScenarioBuilder
from tests.web.test_web import TOKEN, Traffic, send_traffic, web_settings

pytestmark = pytest.mark.anyio

CHROMIUM = os.environ.get("DUALWRITE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def chromium() -> str:
    """The Chromium binary; fails (never skips) with the command that installs it."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the browser test needs Debian's Chromium at {CHROMIUM}; install it with:\n"
            "  apt-get install -y chromium\n"
            "(`bash .ci/run` installs it when it is missing)",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    """Headless Chromium, driven by Playwright."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "the browser test needs Playwright for Python: pip install -e '.[dev]' "
            "(never `playwright install`: the system Chromium is used)",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def settings(redis_url: str, key_prefix: str, standin_url: str) -> Settings:
    """Settings on this test's prefix, with the report token."""
    return web_settings(redis_url, key_prefix, standin_url)


@pytest.fixture
async def traffic(settings, standin_url, standin) -> Traffic:
    """Usage for five customers, delivered (the same as tests/web/test_web.py's)."""
    builder = ScenarioBuilder(standin_url, STRIPE_KEY)
    engine = DualWriteEngine.from_settings(settings)
    await engine.start(worker=False)
    try:
        return await send_traffic(engine, builder, standin)
    finally:
        await engine.aclose()
        await builder.aclose()


@pytest.fixture
def base_url(settings) -> Any:
    """The report app served by uvicorn in a thread, with its own Redis connection."""
    # The lifespan closes the app's Redis connection in the server's own event loop.
    with serve_app(report_app(settings), lifespan=True) as url:
        yield url


async def customer_ids(page: Any) -> list[str]:
    """The customer ids in the overview's table, in order."""
    return [
        text.strip()
        for text in await page.locator("table.customers tbody td:first-child").all_inner_texts()
    ]


class TestInBrowser:
    """Sign in, read the overview, filter with the form, open a customer."""

    async def test_overview_filter_and_customer(self, browser, base_url, traffic):
        """The page renders, the filter form narrows the table, screenshots are saved."""
        ARTIFACTS.mkdir(exist_ok=True)
        context = await browser.new_context(viewport={"width": 1360, "height": 900})
        page = await context.new_page()

        # Signing in through the form of the 401 page sets the cookie and lands on the overview.
        response = await page.goto(f"{base_url}/")
        assert response is not None and response.status == 401
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("table.customers")
        assert await page.title() == "Overview · dualwrite"
        assert sorted(await customer_ids(page)) == sorted(traffic.customers.values())
        assert await page.locator("svg rect.bar").count() == 1
        cookies = await context.cookies()
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
            ("dualwrite_report", True, "Strict")
        ]
        await page.screenshot(path=str(ARTIFACTS / "report-overview.png"), full_page=True)

        # The filter form: stage shadow, then only divergent.
        await page.select_option("select[name=stage]", "shadow")
        await page.click("form.filters button[type=submit]")
        await page.wait_for_url("**/?*stage=shadow*")
        assert sorted(await customer_ids(page)) == sorted([traffic["shadow"], traffic["refused"]])
        await page.check("input[name=divergent]")
        await page.click("form.filters button[type=submit]")
        await page.wait_for_url("**divergent=1*")
        assert await customer_ids(page) == [traffic["refused"]]
        assert await page.locator("#customer-count").inner_text() == "1"
        await page.screenshot(path=str(ARTIFACTS / "report-filtered.png"), full_page=True)

        # The customer's page, from its link.
        await page.click(f"table.customers a:has-text('{traffic['refused']}')")
        await page.wait_for_selector("table.periods")
        assert await page.locator("table.divergences tbody tr").count() == 1
        assert await page.locator("table.audit tbody tr").count() == 1
        await page.screenshot(path=str(ARTIFACTS / "report-customer.png"), full_page=True)

        # The flag history, from the navigation: the five overrides the traffic set.
        await page.click("header nav a:has-text('Flag history')")
        await page.wait_for_selector("table.audit")
        assert await page.locator("table.audit tbody tr").count() == len(traffic.customers)
        await page.screenshot(path=str(ARTIFACTS / "report-flags.png"), full_page=True)
        await context.close()

        for page_name in ("overview", "filtered", "customer", "flags"):
            shot = ARTIFACTS / f"report-{page_name}.png"
            assert shot.stat().st_size > 10_000, shot

    async def test_usable_at_390_pixels(self, browser, base_url, traffic):
        """At a phone's 390 px every page fits the width (wide tables scroll in their own box),
        the navigation and the filter form stay reachable, and the chart keeps its caption."""
        ARTIFACTS.mkdir(exist_ok=True)
        context = await browser.new_context(viewport={"width": 390, "height": 844})
        page = await context.new_page()
        await page.goto(f"{base_url}/")
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("table.customers")
        for path, ready in (
            ("/", "table.customers"),
            ("/progress", "table.progress"),
            ("/flags", "table.audit"),
            (f"/customers/{traffic['refused']}", "table.periods"),
        ):
            await page.goto(f"{base_url}{path}")
            await page.wait_for_selector(ready)
            width = await page.evaluate("document.documentElement.scrollWidth")
            wide = await page.evaluate(
                "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect()"
                ".right > 391).slice(0, 5).map(e => e.tagName + '.' + e.className)"
            )
            assert width <= 390, (path, width, wide)
            for link in ("Overview", "Progress", "Flag history"):
                box = await page.locator(f"header nav a:has-text('{link}')").bounding_box()
                assert box is not None and box["x"] + box["width"] <= 390, (path, link, box)
            name = path.strip("/").split("/")[0] or "overview"
            await page.screenshot(path=str(ARTIFACTS / f"report-390-{name}.png"), full_page=True)
        await page.goto(f"{base_url}/")
        assert await page.locator("figure.chart figcaption").is_visible()
        submit = await page.locator("form.filters button[type=submit]").bounding_box()
        assert submit is not None and submit["x"] + submit["width"] <= 390
        await context.close()
