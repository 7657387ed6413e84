"""Issue 7 on every platform: hostile and odd input, unsafe model output, rate
limits, blocked users, allow-lists and `forget`, through the real adapters
(discord.py and slack_bolt against the local fakes, the web API over HTTP)
and the terminal chat. See tests/platform_drivers.py for how each is driven."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import subprocess_env
from fake_discord import CHANNEL_ID, OTHER_CHANNEL_ID, FakeDiscord
from fake_slack import FakeSlack, wait_for
from platform_drivers import DiscordDriver, Scripted, SlackDriver, WebDriver
from test_slack import SECRET
from test_slack import Bot as SlackBot

from adapters.base import APOLOGY
from adapters.discord import NOT_HERE, DiscordAdapter
from adapters.discord import RESET_DONE as DISCORD_RESET_DONE
from adapters.slack import RESET_DONE as SLACK_RESET_DONE
from adapters.slack import SlackAdapter
from bot.engine import ReplyEngine
from bot.errors import EmptyMessage
from bot.memory import open_store
from bot.text import clean_text, neutralize_mentions
from bot.web import build_app

DEFLECTION = "Let's talk about something else, shall we? @here"
BLOCKLIST = "zorblax\npurple monkey\n"
Driver = DiscordDriver | SlackDriver | WebDriver


@dataclass
class Platforms:
    """Starts drivers over fresh fakes and engines; closes them all afterwards."""

    tiny_model: object
    make_settings: Callable
    blocklist: object
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def _engine(self, model: Scripted, **overrides) -> tuple[ReplyEngine, object]:
        settings = self.make_settings(safety_blocklist=self.blocklist, safety_deflection=DEFLECTION, **overrides)
        return ReplyEngine(model, open_store("memory://", max_turns=settings.memory_max_turns), settings), settings

    async def open(self, platform: str, *, model: Scripted | None = None, **overrides) -> Driver:
        model = model or Scripted(self.tiny_model)
        return await getattr(self, "_" + platform.replace("-", "_"))(model, **overrides)

    async def _discord(self, model: Scripted, **overrides) -> DiscordDriver:
        fake = FakeDiscord()
        await fake.start()
        self.cleanups.append(fake.stop)
        engine, settings = self._engine(
            model, discord_token=fake.token, discord_api_url=fake.api_url, discord_gateway_url=fake.gateway_url,
            **overrides,
        )
        await engine.start()
        self.cleanups.append(engine.close)
        adapter = DiscordAdapter(settings, engine)
        self.cleanups.append(self._stopper(adapter))
        await adapter.start()
        return DiscordDriver(fake, adapter, engine, model)

    async def _slack(self, model: Scripted, *, socket_mode: bool, **overrides) -> SlackDriver:
        fake = await FakeSlack().start()
        self.cleanups.append(fake.close)
        tokens = {"slack_app_token": "xapp-test"} if socket_mode else {"slack_signing_secret": SECRET}
        engine, settings = self._engine(model, slack_bot_token="xoxb-test", slack_api_url=fake.api_url, **tokens,
                                        **overrides)
        await engine.start()
        self.cleanups.append(engine.close)
        adapter = SlackAdapter(settings, engine)
        app = web.Application()
        adapter.mount(app)
        runner = web.AppRunner(app)
        await runner.setup()
        self.cleanups.append(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        session = aiohttp.ClientSession()
        self.cleanups.append(session.close)
        self.cleanups.append(self._stopper(adapter))
        await adapter.start()
        bot = SlackBot(adapter, engine, model, f"http://127.0.0.1:{port}/slack/events", session)
        return SlackDriver(fake, bot, socket_mode=socket_mode)

    async def _slack_http(self, model: Scripted, **overrides) -> SlackDriver:
        return await self._slack(model, socket_mode=False, **overrides)

    async def _slack_socket(self, model: Scripted, **overrides) -> SlackDriver:
        return await self._slack(model, socket_mode=True, **overrides)

    async def _web(self, model: Scripted, **overrides) -> WebDriver:
        engine, settings = self._engine(model, **overrides)
        await engine.start()
        self.cleanups.append(engine.close)
        client = TestClient(TestServer(build_app(engine, settings), host="127.0.0.1", port=0))
        await client.start_server()
        self.cleanups.append(client.close)
        return WebDriver(client, engine, model)

    @staticmethod
    def _stopper(adapter) -> Callable[[], Awaitable[None]]:
        async def stop() -> None:
            adapter.stop_accepting()
            await adapter.drain(10)
            await adapter.close()

        return stop


@pytest.fixture
def blocklist(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text(BLOCKLIST, encoding="utf-8")
    return path


@pytest.fixture
async def platforms(tiny_model, make_settings, blocklist) -> AsyncIterator[Platforms]:
    opened = Platforms(tiny_model, make_settings, blocklist)
    yield opened
    for cleanup in reversed(opened.cleanups):
        await cleanup()


def model_answered(driver: Driver, sent: str) -> bool:
    """`sent` is the model's reply (the parrot's), not a notice or the deflection."""
    return "(you said:" in driver.readable(sent)


# -- hostile and odd input ---------------------------------------------------------

MODEL, EMPTY, TOO_LONG, DEFLECT, SILENCE = "model", "empty", "too long", "deflection", "silence"


@dataclass(frozen=True)
class Case:
    text: str | dict[str, str]  # per platform where they differ
    expected: str | dict[str, str]  # one of the outcomes above; a platform missing from a dict is not run
    where: str = "channel"  # "channel" (addressed with a mention), "dm", "unaddressed"
    intact: bool = False  # the model sees exactly clean_text(text) everywhere

    def on(self, platform: str) -> tuple[str, str | None]:
        text = self.text if isinstance(self.text, str) else self.text.get(platform, "")
        expected = self.expected if isinstance(self.expected, str) else self.expected.get(platform)
        return text, expected


HOSTILE = {
    "empty": Case("", EMPTY, where="dm"),
    "only controls and spaces": Case(" \x00\x07\u200b\n\t ", EMPTY),
    # Discord and Slack: nothing but the bot's mention. The web API has no bot to mention: someone else's.
    "mention only": Case({"web": "<@U024BE7LH>"}, {"discord": EMPTY, "slack": EMPTY, "web": MODEL}),
    "100,000 characters": Case("x" * 100_000, TOO_LONG),
    "control and zero-width": Case("hel\x00lo\u200b the\x1bre\ufeff, how\u2060 are\x7f you?", MODEL, intact=True),
    "right-to-left": Case("שלום, מה שלומך? مرحبا كيف حالك", MODEL, intact=True),
    "bidi override": Case("abc \u202egnp.exe", MODEL, intact=True),
    "emoji": Case("👩‍💻 🏳️‍🌈 👍🏽 🙂", MODEL, intact=True),
    "code fence": Case("```python\nprint('<@&1> @everyone')\n```", MODEL),
    "@everyone and @here": Case("@everyone @here look at this & that", MODEL),
    "<!channel> and friends": Case("<!channel> <!here> <!everyone> <!subteam^S123|@devs> hello", MODEL),
    "user and role mentions": Case("<@&850000000000000001> <@!7> <@U3> <@U024BE7LH|eve> hey", MODEL),
    "block-listed, lower case": Case("you are a zorblax", DEFLECT),
    "block-listed, upper case": Case("YOU ARE A ZORBLAX", DEFLECT),
    "block-listed phrase, mixed case": Case("what a Purple MONKEY!", DEFLECT),
    "offensive": Case("shut up you stupid fucking bot", DEFLECT),
    "@everyone, not addressed to the bot": Case(
        "@everyone meeting in five", {"discord": SILENCE, "slack": SILENCE}, where="unaddressed"
    ),
}
HOSTILE_RUNS = [
    pytest.param(platform, case, id=f"{platform}-{name}")
    for name, case in HOSTILE.items()
    for platform in ("discord", "slack", "web")
    if case.on(platform)[1] is not None
]
NOTICES = {EMPTY: EmptyMessage.user_message, DEFLECT: neutralize_mentions(DEFLECTION)}
WEB_STATUS = {MODEL: 200, DEFLECT: 200, EMPTY: 400, TOO_LONG: 413}


@pytest.mark.parametrize(("platform", "case"), HOSTILE_RUNS)
async def test_hostile_input_gets_a_clear_answer_or_silence_and_pings_nobody(platforms, platform, case, caplog):
    driver = await platforms.open("slack-http" if platform == "slack" else platform)
    text, expected = case.on(platform)

    sent = await driver.say(text, where=case.where)
    if expected == SILENCE:
        await driver.settle()
        assert driver.replies(sent) == []
    else:
        reply = driver.readable(await driver.reply(sent))
        if expected == MODEL:
            assert model_answered(driver, reply), reply
        elif expected == TOO_LONG:
            assert "too long" in reply and "100,000 characters" in reply, reply
        else:
            assert reply == NOTICES[expected]
        if platform == "web":
            assert driver.status(sent) == WEB_STATUS[expected]
    history = await driver.engine.history(driver.conversation(sent))
    if expected == MODEL:
        [turns] = driver.model.asked()
        assert [exchange.user for exchange in history] == [turns[-1]]  # what the model saw is what is kept
        assert clean_text(turns[-1]) == turns[-1]
        if case.intact:
            assert turns[-1] == clean_text(text)
    else:
        assert driver.model.asked() == [] or expected == SILENCE
        assert history == []  # nothing stored for a notice, a deflection or a silence

    # Nothing crashed: the next ordinary message is answered as usual.
    assert model_answered(driver, await driver.reply(await driver.say("and how are you today?")))
    driver.assert_nothing_pings()
    assert APOLOGY not in [driver.readable(r) for r in driver.replies(sent)]
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
