"""The console in a real browser: Debian's Chromium driven by Playwright, against a real daemon.

One `plugin-host run` process (with an auth token) and one browser serve the whole module;
each test opens its own browser context (its own sessionStorage) and uses its own plugins.
The last test takes the README's screenshots: into the test's temporary directory, or over
docs/console.png and docs/console-narrow.png with ``PLUGIN_HOST_SCREENSHOTS=docs``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright
from pymongo import AsyncMongoClient

from host import publish
from host.triggers.lease import state_collection_name

from .daemon_support import Daemon, free_port, wait_ready
from .support import Db

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("PLUGIN_HOST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # This machine has no internet: no background calls home at every start.
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TOKEN = "browser-token"
WAIT_MS = 15_000  # the page's own updates: events within ~0.1 s, polling every 2-4 s
expect.set_options(timeout=WAIT_MS)
GREET = (ROOT / "plugins_examples" / "greet.py").read_text()
VERSION = "async def main(ctx, args):\n    return {n}\n"


@dataclass
class Console:
    """The daemon under test."""

    url: str
    mongo_uri: str
    database: str

    def run(self, job: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``job()`` on an event loop of its own thread (Playwright's API is sync)."""
        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            return worker.submit(anyio.run, job).result()

    def db(self, job: Callable[[Db], Awaitable[Any]]) -> Any:
        """Run ``job(db)`` on a fresh async client."""

        async def main() -> Any:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.mongo_uri)
            try:
                return await job(client[self.database])
            finally:
                await client.close()

        return self.run(main)

    def push(self, name: str, source: str) -> None:
        """Publish ``source`` as ``name`` (what `plugin-host push` does)."""
        self.db(lambda db: publish.publish(db, name, source))


@pytest.fixture(scope="module")
def console(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A `plugin-host run` daemon with a token, serving greet (killed at the end)."""
    database = f"console_{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{free_port()}"
    found = Console(url, mongo_uri, database)
    found.push("greet", GREET)
    daemon = Daemon.run(
        tmp_path_factory.mktemp("console"),
        mongo_uri,
        database,
        url.removeprefix("http://"),
        "--auth-token",
        TOKEN,
        "--debug",
        "--heartbeat",
        "1",
    )
    try:

        async def ready() -> None:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=url, timeout=2, headers=auth) as client:
                await wait_ready(client, daemon)

        found.run(ready)
        yield found
    finally:
        daemon.stop()
        found.db(lambda db: db.client.drop_database(database))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless (skips, saying why, where it is not installed)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium with apt-get "
            "when it runs as root (or set PLUGIN_HOST_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Tab:
    """One page, with what its console and its requests reported."""

    page: Page
    errors: list[str]


def open_tab(
    browser: Browser, console: Console, *, token: bool = True, width: int = 1280, height: int = 800
) -> Tab:
    """A new context and page on the console; with ``token``, the tab already holds it."""
    size: ViewportSize = {"width": width, "height": height}
    context = browser.new_context(viewport=size, timezone_id="Europe/Paris", locale="en-GB")
    if token:
        context.add_init_script(f"sessionStorage.setItem('plugin-host-token', '{TOKEN}')")
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.goto(f"{console.url}/console")
    return Tab(page, errors)


@pytest.fixture
def tab(browser: Browser, console: Console) -> Iterator[Tab]:
    """A 1280x800 tab holding the token; closed after the test."""
    opened = open_tab(browser, console)
    yield opened
    opened.page.context.close()


def row(page: Page, name: str) -> Any:
    """The Plugins row of ``name``."""
    return page.locator(f'#plugins-body tr[data-plugin="{name}"]')


def test_page_loads_asks_for_the_token_once_and_logs_no_error(
    browser: Browser, console: Console
) -> None:
    """The page asks for the token, then shows the plugins, with no console error."""
    tab = open_tab(browser, console, token=False)
    page = tab.page
    try:
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_visible()
        page.fill("#token-input", TOKEN)
        page.keyboard.press("Enter")  # keyboard only
        expect(dialog).to_be_hidden()
        greet = row(page, "greet")
        expect(greet.locator(".version")).to_have_text(re.compile(r"^r1:"))
        expect(greet.locator(".status")).to_contain_text("serving")
        expect(page.locator("#live")).to_contain_text("live")
        expect(page.locator("#fleet-table")).to_contain_text("✓ r1")
        loaded = greet.locator("time").first
        assert "UTC" in (loaded.get_attribute("title") or "")  # local time, UTC on hover
        page.reload()  # the token stays in the tab: not asked again
        expect(row(page, "greet").locator(".status")).to_contain_text("serving")
        expect(dialog).to_be_hidden()
        assert tab.errors == []
    finally:
        page.context.close()


def test_push_shows_the_new_version_without_reload(tab: Tab, console: Console) -> None:
    """A push goes live in the row, and in the Events panel, with no reload."""
    console.push("pushed", VERSION.format(n=1))
    expect(row(tab.page, "pushed").locator(".version")).to_have_text(re.compile(r"^r1:"))
    tab.page.evaluate("window.__same_document = true")
    console.push("pushed", VERSION.format(n=2))
    expect(row(tab.page, "pushed").locator(".version")).to_have_text(re.compile(r"^r2:"))
    reloaded = tab.page.locator('#events-list li[data-event="plugin.reloaded"]')
    expect(reloaded.filter(has_text="pushed")).to_contain_text("r1:")
    assert tab.page.evaluate("window.__same_document") is True  # the page was not reloaded
    assert tab.errors == []


def test_refused_version_shows_its_error(tab: Tab, console: Console) -> None:
    """A version that fails to load: the row says degraded, with the plugin's traceback."""
    console.push("broken", VERSION.format(n=1))
    expect(row(tab.page, "broken").locator(".status")).to_contain_text("serving")
    console.push("broken", "import no_such_module\n\n" + VERSION.format(n=2))
    broken = row(tab.page, "broken")
    expect(broken.locator(".status")).to_contain_text("degraded")
    expect(broken.locator(".version")).to_have_text(re.compile(r"^r1:"))  # r1 still serves
    summary = broken.locator(".last-error summary")
    expect(summary).to_contain_text("No module named 'no_such_module'")
    summary.focus()
    tab.page.keyboard.press("Enter")  # opens the traceback, by keyboard
    expect(broken.locator("pre.tb")).to_contain_text('File "<plugin broken@r2>"')
    cell = tab.page.locator('#fleet-table td[data-plugin="broken"]')
    expect(cell).to_contain_text("refused r2")
    expect(tab.page.locator('#events-list li[data-event="plugin.reload_failed"]')).to_contain_text(
        "broken r2 refused"
    )
    assert tab.errors == []


def test_abort_button_ends_the_rollout_and_needs_the_token(tab: Tab, console: Console) -> None:
    """Abort without the token is refused (401) and changes nothing; with it, the rollout ends."""
    console.push("canary", VERSION.format(n=1))
    console.db(lambda db: publish.start_rollout(db, "canary", VERSION.format(n=2), weight=25))
    page = tab.page
    rollout = page.locator('#rollouts-body article[data-rollout="canary"]')
    expect(rollout.locator("h3")).to_have_text(re.compile(r"canary: canary r2:\w+ at 25 %"))
    expect(rollout).to_contain_text("stable")

    def record() -> Any:
        return console.db(lambda db: db.functions.find_one({"_id": "canary"}))

    page.evaluate("sessionStorage.removeItem('plugin-host-token')")
    rollout.get_by_role("button", name="Abort").click()
    expect(page.locator("#confirm-dialog")).to_contain_text("Abort the rollout of canary@r2")
    page.locator("#confirm-ok").click()
    expect(rollout.locator(".result")).to_contain_text("refused (401")
    assert record()["rollout"]["revision"] == 2  # nothing changed

    expect(page.locator("#token-button")).to_have_text("Set token")  # the tab has none now
    page.locator("#token-button").click()
    page.fill("#token-input", TOKEN)
    page.locator("#token-save").click()
    rollout.get_by_role("button", name="Abort").click()
    page.locator("#confirm-ok").click()
    ended = page.locator('#rollouts-body li[data-last-rollout="canary"]')
    expect(ended).to_contain_text("aborted")
    expect(ended).to_contain_text("by console")
    after = record()
    assert "rollout" not in after
    assert (after["last_rollout"]["outcome"], after["last_rollout"]["by"]) == ("aborted", "console")
    assert [e for e in tab.errors if "401" not in e] == []  # the refused click's own 401 only


def test_trigger_lag_is_displayed(tab: Tab, console: Console) -> None:
    """A trigger's state shows in the Triggers panel: owner, status, lag, events/s."""
    state: dict[str, Any] = {
        "_id": "greet/users",
        "plugin": "greet",
        "name": "users",
        "collection": "users",
        "owner": None,
        "status": "running",
        "lag_ms": 1234.5,
        "events_per_s": 12.5,
        "processed": 42,
        "history_lost": [],
    }
    console.db(lambda db: db[state_collection_name("functions")].insert_one(state))
    trigger = tab.page.locator('#triggers-body tr[data-trigger="greet/users"]')
    expect(trigger.locator(".lag")).to_have_text("1.23 s")
    expect(trigger).to_contain_text("running")
    expect(trigger).to_contain_text("12.5")
    assert tab.errors == []


def test_a_running_triggers_lag_is_displayed(tab: Tab, console: Console) -> None:
    """A real trigger: an insert reaches its handler and the panel shows its owner and lag."""
    source = (
        'TRIGGERS = [{"collection": "console_orders"}]\n\n'
        "async def on_change(ctx, event):\n"
        "    pass\n"
    )
    console.db(
        lambda db: publish.publish(
            db, "counter", source, triggers=[{"collection": "console_orders"}]
        )
    )
    trigger = tab.page.locator('#triggers-body tr[data-trigger="counter/console_orders"]')
    expect(trigger).to_contain_text("running")

    async def insert(db: Db) -> None:
        await db.console_orders.insert_many([{"n": n} for n in range(5)])

    console.db(insert)
    # The lag cell fills in once the engine has handled an event and written its state.
    expect(trigger.locator(".lag")).to_have_text(re.compile(r"^\d+(\.\d+)? (ms|s)$"))
    assert tab.errors == []


def test_screenshots(browser: Browser, console: Console, tmp_path: Path) -> None:
    """The README's screenshots (console.png 1280x800, console-narrow.png) show a busy console.

    They go to the test's temporary directory, so ``make test`` leaves a clean clone clean;
    ``PLUGIN_HOST_SCREENSHOTS=docs`` writes them over docs/ (any other value: that folder).
    """
    wanted = os.environ.get("PLUGIN_HOST_SCREENSHOTS", "")
    folder = ROOT / "docs" if wanted == "docs" else Path(wanted) if wanted else tmp_path
    with httpx.Client(base_url=console.url, timeout=10) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        args = {"firstName": "Blain", "lastName": "Smith"}
        for _ in range(30):
            assert client.post("/functions/greet/call", json=args, headers=auth).is_success
        client.post("/functions/greet/call", json={"firstName": "Ada"}, headers=auth)
    console.db(lambda db: publish.start_rollout(db, "pushed", VERSION.format(n=3), weight=30))
    with httpx.Client(base_url=console.url, timeout=10) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(60):  # some for the candidate: the stats side by side have numbers
            assert client.post("/functions/pushed/call", headers=auth).is_success
    shots = (
        (folder / "console.png", 1280, 800),
        (folder / "console-narrow.png", 420, 900),
    )
    for path, width, height in shots:
        tab = open_tab(browser, console, width=width, height=height)
        try:
            greet = row(tab.page, "greet")
            expect(greet.locator(".last-error")).to_contain_text("KeyError")
            expect(greet.locator("td.num").first).not_to_have_text("0.00")
            running = tab.page.locator('#rollouts-body article[data-rollout="pushed"]')
            calls = running.locator("table.side-by-side tbody tr").nth(1).locator("td").first
            expect(calls).not_to_have_text("0")  # the hosts reported the candidate's calls
            tab.page.screenshot(path=str(path))
        finally:
            tab.page.context.close()
        assert path.stat().st_size > 10_000, path
