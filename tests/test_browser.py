"""The web chat page in a real browser: headless Chromium (Debian's package)
driven by Playwright, against `python -m bot run`, and (for rating and "Try
again", whose answers the test must know) against the web app served from the
test over a model double."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from bot_process import BotProcess, http, port_env
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from test_try_again import Takes

from bot.config import Settings
from bot.engine import ReplyEngine
from bot.memory import open_store
from bot.web import build_app

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "install Debian's chromium package (.ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


def start_bot(tmp_path: Path, model: Path, **env: str) -> BotProcess:
    bot = BotProcess(
        tmp_path / "bot.log",
        BLENDERBOT_MODEL=str(model),
        BLENDERBOT_MAX_NEW_TOKENS="8",
        BLENDERBOT_NUM_BEAMS="1",
        MEMORY_URL=f"sqlite:///{tmp_path / 'memory.db'}",
        **(port_env() | env),
    )
    bot.wait_ready()
    return bot


def send(page: Page, text: str) -> str:
    """Type and send `text`, see the "thinking" state while the server works, return the reply shown."""
    held: list[Route] = []

    def hold(route: Route) -> None:  # hold the request so the thinking state can be seen
        held.append(route)

    page.route("**/api/chat", hold)
    page.fill("#text", text)
    page.click("#send")
    expect(page.locator(".msg.thinking")).to_have_text("thinking…")
    while not held:
        page.wait_for_timeout(20)
    held[0].continue_()
    page.unroute("**/api/chat")
    expect(page.locator(".msg.thinking")).to_have_count(0)
    last = page.locator(".msg").last
    expect(last).to_have_class("msg bot")
    return last.inner_text()


def test_chat_page_answers_and_keeps_the_conversation(browser: Browser, blenderbot_dir: Path, tmp_path: Path) -> None:
    bot = start_bot(tmp_path, blenderbot_dir)
    try:
        page = browser.new_page()
        page.goto(bot.base + "/")
        expect(page.locator("#text")).to_be_visible()
        first = send(page, "hello <b>there</b>")
        second = send(page, "do you like pizza?")
        assert first.strip() and second.strip()
        conversation = page.evaluate("localStorage.getItem('blenderchat.conversation')")

        # What the page shows is what the server stored.
        _, _, stored = http("GET", f"{bot.base}/api/history?conversation={conversation}")
        assert [(e["user"], e["bot"]) for e in stored["exchanges"]] == [
            ("hello <b>there</b>", first), ("do you like pizza?", second)
        ]

        page.reload()
        messages = page.locator(".msg")
        expect(messages).to_have_count(4)
        # Shown as text, never as HTML.
        assert messages.all_inner_texts() == ["hello <b>there</b>", first, "do you like pizza?", second]
        assert page.locator("#log b").count() == 0

        page.click("#reset")
        expect(messages).to_have_count(0)
        expect(page.locator("#welcome")).to_be_visible()
        assert page.evaluate("localStorage.getItem('blenderchat.conversation')") != conversation
        page.close()
    finally:
        bot.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])  # a token set is needed on loopback too (a proxy)
def test_chat_page_asks_for_the_token_when_the_server_needs_one(
    browser: Browser, blenderbot_dir: Path, tmp_path: Path, host: str
) -> None:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    bot = start_bot(tmp_path, blenderbot_dir, HTTP_HOST=host, HTTP_PORT=str(port), WEB_API_TOKEN="page-token")
    try:
        page = browser.new_page()
        page.goto(bot.base + "/")
        expect(page.locator("#token-form")).to_be_visible()  # the history request got 401
        page.fill("#token", "page-token")
        page.click("#token-form button")
        expect(page.locator("#token-form")).to_be_hidden()
        assert send(page, "hello").strip()
        # The page sent it: the API still refuses anyone without it.
        assert http("POST", bot.base + "/api/chat", {"conversation": "x", "text": "hi"})[0] == 401
        page.close()
    finally:
        bot.close()


def test_chat_page_at_phone_width_wraps_welcomes_and_says_when_the_bot_is_down(
    browser: Browser, blenderbot_dir: Path, tmp_path: Path
) -> None:
    bot = start_bot(tmp_path, blenderbot_dir)
    try:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        problems: list[str] = []  # console errors and warnings, failed requests (a missing favicon...)
        page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
        page.on("response", lambda response: problems.append(f"{response.status} {response.url}") if response.status >= 400 else None)
        with page.expect_response("**/static/favicon.svg") as icon:
            page.goto(bot.base + "/")
        assert icon.value.status == 200
        welcome = page.locator("#welcome")
        expect(welcome).to_be_visible()
        expect(welcome).to_contain_text("Say hello")

        word = "https://example.com/" + "a" * 280  # one 300-character word
        send(page, word)
        expect(welcome).to_have_count(0)
        bubble = page.locator(".msg.user").first
        assert bubble.inner_text() == word
        no_sideways_scroll = """() => [document.documentElement, document.getElementById("log")]
            .every(element => element.scrollWidth <= element.clientWidth)"""
        assert page.evaluate(no_sideways_scroll)
        log_box, word_box = page.locator("#log").bounding_box(), bubble.bounding_box()
        assert log_box and word_box and word_box["x"] + word_box["width"] <= log_box["x"] + log_box["width"]

        send(page, "hi")  # a short message gets a small bubble, on the right
        short = page.locator(".msg.user").last.bounding_box()
        assert short and short["width"] < log_box["width"] / 4
        assert word_box["height"] > 2 * short["height"]  # the long word wrapped onto several lines
        assert short["x"] + short["width"] > log_box["x"] + log_box["width"] * 0.9
        assert problems == []

        bot.close()  # the server goes away with the page still open
        page.fill("#text", "are you there?")
        page.click("#send")
        error = page.locator(".msg.error")
        expect(error).to_have_count(1)
        expect(error).to_contain_text("Can't reach the bot")
        assert "Failed to fetch" not in page.locator("#log").inner_text()
        expect(page.locator("#text")).to_have_value("are you there?")  # nothing typed is lost
        page.close()
    finally:
        bot.close()


# -- rating and "Try again" under each answer (issue 21, items 4 and 5) -----------------------


@contextmanager
def web_chat(model: Any, settings: Settings) -> Iterator[str]:
    """The web app (page and API) over a real engine and `model`, served by aiohttp on a real
    port from a thread of its own (the browser is driven synchronously); yields its base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        engine = ReplyEngine(model, open_store(settings.memory_url, max_turns=5), settings)
        await engine.start()
        runner = web.AppRunner(build_app(engine, settings))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["stop"] = asyncio.Event()
        box["base"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        started.set()
        try:
            await box["stop"].wait()
        finally:
            await runner.cleanup()
            await engine.close(timeout=5)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), name="web-chat")
    thread.start()
    try:
        assert started.wait(60), "the web chat did not start"
        yield box["base"]
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        loop.close()


def test_chat_page_rates_answers_and_tries_again_on_the_latest(
    browser: Browser, tiny_model: Any, make_settings: Any, tmp_path: Path
) -> None:
    model = Takes(tiny_model)  # its answers say which take they are: nothing depends on the random model's words
    settings = make_settings(memory_url=f"sqlite:///{tmp_path / 'memory.db'}")
    with web_chat(model, settings) as base:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text)
                if message.type in ("error", "warning") else None)
        page.goto(base + "/")
        assert send(page, "hello") == "take 1: hello"
        assert send(page, "how are you?") == "take 2: how are you?"
        conversation = page.evaluate("localStorage.getItem('blenderchat.conversation')")
        bars = page.locator(".actions")
        expect(bars).to_have_count(2)
        # "Try again" only under the latest answer; 👍 / 👎 under each, none chosen yet.
        expect(page.locator(".actions .again")).to_have_count(1)
        expect(bars.last.locator(".again")).to_have_text("🔁 Try again")
        for button in page.locator(".actions .rate").all():
            expect(button).to_have_attribute("aria-pressed", "false")

        first, latest = bars.first, bars.last
        first.locator(".rate.bad").click()
        expect(first.locator(".rate.bad")).to_have_attribute("aria-pressed", "true")
        first.locator(".rate.good").click()  # changed their mind: the chosen one moves
        expect(first.locator(".rate.good")).to_have_attribute("aria-pressed", "true")
        expect(first.locator(".rate.bad")).to_have_attribute("aria-pressed", "false")
        latest.locator(".rate.bad").click()
        expect(latest.locator(".rate.bad")).to_have_attribute("aria-pressed", "true")
        _, _, report = http("GET", base + "/api/feedback")
        assert report["counts"] == {"web": {"good": 1, "bad": 1}}
        assert sorted((r["exchange"]["user"], r["rating"]) for r in report["recent"]) == [
            ("hello", "good"), ("how are you?", "bad")]

        # Try again: the answer is replaced in place, and the bad rating was the old answer's, not this one's.
        latest.locator(".again").click()
        bubbles = page.locator(".msg.bot")
        expect(bubbles.last).to_have_text("sampled take 3: how are you?")
        expect(latest.locator(".rate.bad")).to_have_attribute("aria-pressed", "false")
        assert model.samples[-1] is True
        _, _, stored = http("GET", f"{base}/api/history?conversation={conversation}")
        assert [(e["user"], e["bot"]) for e in stored["exchanges"]] == [
            ("hello", "take 1: hello"), ("how are you?", "sampled take 3: how are you?")]
        assert latest.get_attribute("data-exchange") == stored["exchanges"][1]["id"]
        latest.locator(".rate.good").click()
        expect(latest.locator(".rate.good")).to_have_attribute("aria-pressed", "true")

        assert problems == []

        # No different answer this time: the page says so and keeps the answer.
        model.same = True
        latest.locator(".again").click()
        expect(latest.locator(".note")).to_have_text(
            "I couldn't come up with a different answer this time. Please try again.")
        expect(bubbles.last).to_have_text("sampled take 3: how are you?")
        expect(latest.locator(".again")).to_be_enabled()

        # On reload: the stored answers, each with the rating chosen in this browser.
        page.reload()
        expect(page.locator(".msg")).to_have_count(4)
        assert page.locator(".msg").all_inner_texts() == [
            "hello", "take 1: hello", "how are you?", "sampled take 3: how are you?"]
        expect(bars.first.locator(".rate.good")).to_have_attribute("aria-pressed", "true")
        expect(bars.last.locator(".rate.good")).to_have_attribute("aria-pressed", "true")
        expect(bars.last.locator(".rate.bad")).to_have_attribute("aria-pressed", "false")
        expect(page.locator(".actions .again")).to_have_count(1)
        assert [problem for problem in problems if "409 (Conflict)" not in problem] == []  # Chromium logs the 409
        page.close()
