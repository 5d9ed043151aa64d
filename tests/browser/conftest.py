"""Real headless Chromium (Debian's) driven by Playwright against a real hypercorn.

Every page is fenced in: any request not to the server's own origin is recorded and
aborted, and the test fails if there was one, or if the browser reported a
Content-Security-Policy violation. A failing test leaves screenshots in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright

from hitl import Config
from hitl.processors import Processor

from ..conftest import LiveServer, start_server, stop_server, within

CHROMIUM = Path(os.environ.get("HITL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"

# Browser tests carry both marks; without Debian's chromium they skip, saying why.
browser_test = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


# axe-core from the npm registry, for the tests only (`npm ci --prefix tests/browser`).
axe_test = pytest.mark.skipif(not AXE.exists(),
                              reason=f"{AXE} is missing (npm ci --prefix tests/browser)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "screenshots: regenerates docs/screenshots "
                                       "(HITL_UPDATE_SCREENSHOTS=1 writes them there)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Slow enough processing that progress is visible; sign-in off (``--auth none``), as
    in tests/conftest.py: the sign-in tests turn accounts on."""
    return Config(db=str(tmp_path / "hitl.db"), process_delay=0.3, retry_wait=0,
                  shutdown_timeout=1, auth="none")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                   args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


# Injected by Playwright (not subject to the page's CSP): keeps every SSE message the
# page's htmx received, so a test can check what arrived, not only what is shown now.
RECORDER = """
window.__hitl_seen = [];
document.addEventListener("htmx:sseMessage", function (event) {
  window.__hitl_seen.push([event.detail.type, event.detail.data]);
});
document.addEventListener("htmx:sseClose", function () { window.__hitl_closed = true; });
window.__hitl_flashes = [];
document.addEventListener("htmx:afterSwap", function (event) {
  if (event.target.id === "flash") window.__hitl_flashes.push(event.target.innerText);
});
"""


async def flashes(page: Page) -> list[str]:
    """Every notice the page's decision form received (it may be cleared since)."""
    return list(await page.evaluate("window.__hitl_flashes"))


async def seen(page: Page, event: str) -> list[str]:
    """The HTML of every ``event`` the page's stream delivered so far."""
    messages = await page.evaluate("window.__hitl_seen")
    return [html for name, html in messages if name == event]


@dataclass
class Session:
    """One browser profile on the live server: opens pages, fenced to the server's origin."""

    context: BrowserContext
    origin: str
    pages: list[Page] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    csp_reports: list[str] = field(default_factory=list)

    async def fence(self, route: Route) -> None:
        self.requests.append(route.request.url)
        if route.request.url.startswith(self.origin + "/"):
            await route.continue_()
        else:
            self.outside.append(route.request.url)
            await route.abort()

    async def open(self, path: str = "/") -> Page:
        page = await self.context.new_page()
        page.on("console", lambda message: self._console(f"{message.text} at {message.location}"))
        self.pages.append(page)
        await page.goto(self.origin + path)
        await mark(page)
        return page

    def _console(self, text: str) -> None:
        if re.search(r"Content Security Policy|Refused to", text):
            self.csp_reports.append(text)


async def mark(page: Page) -> None:
    """Set a marker on ``window``: it survives live updates, never a reload."""
    await page.evaluate("window.__hitl_marker = 'kept'")


async def marker_kept(page: Page) -> bool:
    return bool(await page.evaluate("window.__hitl_marker === 'kept'"))


async def new_session(browser: Browser, origin: str, **options: Any) -> Session:
    """A fresh browser profile (context) fenced to ``origin``, recording SSE messages."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, **options)
    context.set_default_timeout(10_000)
    session = Session(context, origin)
    await context.route("**/*", session.fence)
    await context.add_init_script(RECORDER)
    return session


@asynccontextmanager
async def server_with_session(browser: Browser, config: Config
                              ) -> AsyncIterator[tuple[LiveServer, Session]]:
    """A server of its own on ``config`` (e.g. another ``auth`` than the module's), and a
    browser profile fenced to it; both closed after, the fence checked."""
    server = await start_server(config)
    session = await new_session(browser, server.url)
    try:
        yield server, session
    finally:
        await session.context.close()
        await stop_server(server)
    assert session.outside == [] and session.csp_reports == []


@pytest.fixture
async def session(browser: Browser, live_server: LiveServer,
                  request: pytest.FixtureRequest) -> AsyncIterator[Session]:
    session = await new_session(browser, live_server.url)
    try:
        yield session
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            await save_screenshots(session.pages, request.node.name)
        await session.context.close()
    assert session.outside == [], f"requests left 127.0.0.1: {session.outside}"
    assert session.csp_reports == [], session.csp_reports


async def save_screenshots(pages: list[Page], name: str) -> None:
    """Full-page pictures; ``caret="initial"`` because hiding the caret sets an inline
    style, which the page's CSP rightly blocks (and the fixture would report)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for number, page in enumerate(pages, start=1):
        if not page.is_closed():
            await page.screenshot(path=str(ARTIFACTS / f"{name}-page{number}.png"),
                                  full_page=True, caret="initial")


async def axe_violations(page: Page) -> list[str]:
    """What axe-core finds wrong on ``page`` now, one line per rule broken.

    The script is injected inline, which the page's CSP forbids: open the page in a
    session made with ``bypass_csp=True``. Skips when axe-core is not installed.
    """
    if not AXE.exists():
        pytest.skip(f"axe-core is not installed ({AXE}): npm ci --prefix tests/browser")
    await page.add_script_tag(path=str(AXE))
    results = await page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [f"{rule['id']} ({rule['impact']}): {rule['help']}: "
            f"{[node['target'] for node in rule['nodes']][:5]}" for rule in results["violations"]]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Poll ``check`` until it holds (for conditions Playwright's expect cannot state)."""
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.05)

    await within(poll(), timeout, f"{check.__name__}() to hold")


async def restart_server(server: LiveServer, config: Config,
                         processor: Processor | None = None) -> LiveServer:
    """Stop the server, then serve a new app on the same port and database."""
    await stop_server(server)
    return await start_server(config, processor, port=int(server.url.rsplit(":", 1)[1]))
