"""Issue 7 on every platform: hostile and odd input, unsafe model output, rate
limits, blocked users, allow-lists and `forget`, through the real adapters
(discord.py and slack_bolt against the local fakes, the web API over HTTP)
and the terminal chat. See tests/platform_drivers.py for how each is driven."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import subprocess_env
from fake_discord import CHANNEL_ID, EPHEMERAL, OTHER_CHANNEL_ID, FakeDiscord
from fake_slack import FakeSlack, dm, event_body
from model_doubles import SAFE_REPLY
from platform_drivers import SETTLE_TEXT, DiscordDriver, Scripted, SlackDriver, WebDriver
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


def calls_under(driver: DiscordDriver, prefix: str, containing: str = "") -> list:
    """The Discord fake's REST calls whose path starts with `prefix` (and holds `containing`)."""
    return [call for call in driver.fake.calls if call.path.startswith(prefix) and containing in call.path]


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


# -- unsafe model output -------------------------------------------------------------


def unsafe_first(text: str, turns: list[str], sample: bool) -> str:
    """Greedy decoding says a block-listed word; the sampled retry is harmless (not the tiny
    model's own sampled text, which the classifier flags now and then)."""
    return SAFE_REPLY if sample else f"{text} you ZORBLAX"


def unsafe_always(text: str, turns: list[str], sample: bool) -> str:
    return f"{text} what a purple  monkey" if sample else f"{text} you zorblax"


@pytest.mark.parametrize("platform", ["discord", "slack-http", "web"])
@pytest.mark.parametrize("rewrite", [unsafe_first, unsafe_always], ids=["retry-is-safe", "retry-unsafe-too"])
async def test_unsafe_model_output_is_never_sent_nor_stored(platforms, tiny_model, platform, rewrite):
    model = Scripted(tiny_model, rewrite)
    driver = await platforms.open(platform, model=model)
    sent = await driver.say("hello there, tell me something")
    reply = driver.readable(await driver.reply(sent))

    assert model.samples == [False, True]  # refused, then retried with sampling
    history = await driver.engine.history(driver.conversation(sent))
    if rewrite is unsafe_first:
        assert reply == SAFE_REPLY  # the retry's text, sent
        assert [(exchange.user, exchange.bot) for exchange in history] == [("hello there, tell me something", SAFE_REPLY)]
    else:
        assert reply == neutralize_mentions(DEFLECTION)
        assert history == []
    everything_sent = " ".join(driver.readable(text) for text in driver.replies(sent)).lower()
    stored = " ".join(exchange.bot for exchange in history).lower()
    for unsafe in ("zorblax", "monkey"):
        assert unsafe not in everything_sent and unsafe not in stored
    driver.assert_nothing_pings()


# -- rate limits -----------------------------------------------------------------------

BURST = 3


@pytest.mark.parametrize("platform", ["discord", "slack-http", "slack-socket", "web"])
async def test_a_burst_of_ten_gets_the_burst_and_one_notice_and_a_second_user_is_served(platforms, platform):
    # Almost no refill during the test: a token every ten minutes.
    # A line long enough for the whole burst (CONVERSATION_QUEUE_SIZE): the rate limit is what this is about.
    driver = await platforms.open(platform, rate_limit_burst=BURST, rate_limit_per_minute=0.1,
                                  conversation_queue_size=16)
    burst = [await driver.say(f"message number {i}") for i in range(10)]
    second = await driver.say("hello, I am someone else", user="second")
    assert model_answered(driver, await driver.reply(second))
    await driver.settle()

    answers = [[driver.readable(text) for text in driver.replies(sent)] for sent in burst]
    answered = [a for a in answers if a and model_answered(driver, a[0])]
    notices = [a for a in answers if a and a[0].startswith("You're sending messages faster than I can answer")]
    if platform == "web":  # an HTTP request always gets an answer: the rest are 429s with Retry-After
        assert [driver.status(sent) for sent in burst] == [200] * BURST + [429] * (10 - BURST)
        assert all(driver.answers[sent][2] for sent in burst[BURST:])
    else:
        assert len(answered) == BURST and len(notices) == 1, answers
        assert sum(len(a) for a in answers) == BURST + 1  # silence for the other six
    asked = [turns[-1] for turns in driver.model.asked() if turns[-1] != SETTLE_TEXT]
    assert len(asked) == BURST + 1 and asked[-1] == "hello, I am someone else"
    driver.assert_nothing_pings()


async def test_a_burst_in_one_discord_channel_is_answered_in_order(platforms):
    driver = await platforms.open("discord")
    burst = [await driver.say(f"message number {i}") for i in range(6)]
    replies = [await driver.reply(sent) for sent in burst]
    assert [reply.rsplit("(you said: ", 1)[1] for reply in replies] == [f"message number {i})" for i in range(6)]
    history = await driver.engine.history(driver.conversation(burst[0]))
    assert [exchange.user for exchange in history][-5:] == [f"message number {i}" for i in range(1, 6)]


# -- blocked users and allow-lists -----------------------------------------------------


@pytest.mark.parametrize("platform", ["discord", "slack-http"])
async def test_a_blocked_user_gets_silence_everywhere_and_cannot_forget(platforms, platform):
    driver = await platforms.open(platform, blocked_users=frozenset({str(DiscordDriver.users["first"]), "U2"}))
    # Someone else's conversation, which the blocked user must not be able to wipe.
    kept = await driver.say("remember this for me", user="second")
    assert model_answered(driver, await driver.reply(kept))
    calls_before = len(driver.fake.calls)

    thread = {"thread": kept[1]} if platform.startswith("slack") else {}
    silent = [
        await driver.say("hello, are you there?"),
        await driver.say("forget", **thread),
        await driver.say("hello in private", where="dm"),
    ]
    await driver.settle()

    assert all(driver.replies(sent) == [] for sent in silent)
    assert len(await driver.engine.history(driver.conversation(kept))) == 1
    assert [turns[-1] for turns in driver.model.asked()] == ["remember this for me", SETTLE_TEXT]
    # Not even a typing indicator or a progress reaction: only the settling message was answered.
    later = [call for call in driver.fake.calls[calls_before:]]
    if platform == "discord":
        assert {call.path for call in later if call.path.startswith("/channels/")} == {
            f"/channels/{OTHER_CHANNEL_ID}/typing", f"/channels/{OTHER_CHANNEL_ID}/messages"}
    else:
        assert {call.params["channel"] for call in later if call.method.startswith(("reactions.", "chat."))} == {
            "DSETTLE"}


async def test_a_blocked_discord_user_cannot_reset_with_the_slash_command(platforms):
    driver = await platforms.open("discord", blocked_users=frozenset({str(DiscordDriver.users["first"])}))
    kept = await driver.say("remember this for me", user="second")
    await driver.reply(kept)
    interaction = await driver.fake.slash_command("reset", user_id=DiscordDriver.users["first"])
    [refusal] = await driver.fake.wait_for(lambda: calls_under(driver, f"/interactions/{interaction}/"),
                                           what="the refusal")
    assert refusal.json["data"]["content"] == NOT_HERE  # only they see it (ephemeral)
    assert refusal.json["data"]["flags"] & EPHEMERAL
    assert len(await driver.engine.history(driver.conversation(kept))) == 1


async def test_forget_outside_the_discord_allow_list_is_ignored(platforms):
    driver = await platforms.open("discord", discord_channel_ids=frozenset({str(OTHER_CHANNEL_ID)}))
    sent = await driver.say("forget")  # in #general, not on the list
    await driver.settle()
    assert driver.replies(sent) == [] and driver.fake.touching(CHANNEL_ID) == []


async def test_slack_allow_lists_also_bind_forget_and_dms_from_other_teams(platforms):
    driver = await platforms.open("slack-http", slack_team_ids=frozenset({"T1"}),
                                  slack_channel_ids=frozenset({"CALLOWED"}))
    forget = await driver.say("forget", channel="C1")
    status, _ = await driver.bot.send(event_body(dm("hello from another workspace", channel="DOTHER"), team="T9"))
    assert status == 200
    in_dm = await driver.say("DMs are not bound by the channel list", where="dm")
    assert model_answered(driver, await driver.reply(in_dm))
    await driver.settle()
    assert driver.replies(forget) == []
    assert {post.params["channel"] for post in driver.fake.posts} == {"D1", "DSETTLE"}


# -- forget --------------------------------------------------------------------------


async def forget(driver: Driver, how: str, where: dict) -> str:
    """Ask `driver`'s bot to forget the conversation `where` points at; its confirmation."""
    if how == "web":
        return str(await driver.forget())
    if how == "discord-slash":
        interaction = await driver.fake.slash_command("reset")
        followups = await driver.fake.wait_for(lambda: calls_under(driver, "/webhooks/", str(interaction)),
                                               what="the /reset follow-up")
        return followups[0].json["content"]
    return await driver.reply(await driver.say("Forget!" if how.startswith("slack") else "forget", **where))


FORGET_DONE = {"discord-mention": DISCORD_RESET_DONE, "discord-slash": DISCORD_RESET_DONE,
               "slack-mention": SLACK_RESET_DONE, "slack-dm": SLACK_RESET_DONE, "web": "{'reset': True}"}
FORGET_PLATFORM = {"discord-mention": "discord", "discord-slash": "discord", "slack-mention": "slack-http",
                   "slack-dm": "slack-socket", "web": "web"}


@pytest.mark.parametrize("how", FORGET_DONE)
async def test_forget_confirms_and_the_next_message_starts_afresh(platforms, how):
    driver = await platforms.open(FORGET_PLATFORM[how])
    where = {"where": "dm"} if how == "slack-dm" else {}
    first = await driver.say("my name is Alice", **where)
    await driver.reply(first)
    if how == "slack-mention":
        where = {"thread": first[1]}  # the thread the bot answered in
    await driver.reply(await driver.say("what is my name?", **where))
    assert driver.model.asked()[-1][0] == "my name is Alice"  # the conversation was remembered

    assert await forget(driver, how, where) == FORGET_DONE[how]

    after = await driver.say("who am I?", **where)
    assert model_answered(driver, await driver.reply(after))
    assert driver.model.asked()[-1] == ["who am I?"]  # no earlier history reached the model
    assert driver.conversation(after) == driver.conversation(first)
    assert [exchange.user for exchange in await driver.engine.history(driver.conversation(after))] == ["who am I?"]
    driver.assert_nothing_pings()


@pytest.mark.parametrize("command", ["/reset", "/forget"])
def test_the_terminal_chat_forgets_on_reset_and_forget(tmp_path, blenderbot_dir, command):
    env = subprocess_env(BLENDERBOT_MODEL=str(blenderbot_dir), BLENDERBOT_MAX_NEW_TOKENS="6",
                         BLENDERBOT_NUM_BEAMS="1", MEMORY_URL=f"sqlite:///{tmp_path}/memory.db", LOG_LEVEL="WARNING")
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--conversation", "mine"],
        input=f"my name is Alice\nwhat is my name?\n{command}\nwho am I?\n/quit\n",
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bot> (conversation forgotten)" in result.stdout
    assert len([line for line in result.stdout.splitlines() if "bot> " in line]) == 4

    async def remembered() -> list[str]:
        store = open_store(f"sqlite:///{tmp_path}/memory.db", max_turns=10)
        await store.open()
        try:
            return [exchange.user for exchange in await store.history("mine")]
        finally:
            await store.close()

    assert asyncio.run(remembered()) == ["who am I?"]
