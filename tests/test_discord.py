"""The Discord adapter over the real discord.py client, the tiny model and a
local fake of Discord's gateway and REST API (tests/fake_discord.py)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import subprocess_env
from fake_discord import (
    BOT_ID,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    EPHEMERAL,
    GUILD_ID,
    MESSAGE_CONTENT_INTENT,
    OTHER_BOT_ID,
    OTHER_CHANNEL_ID,
    OTHER_USER_ID,
    ROLE_ID,
    THREAD_ID,
    USER_ID,
    FakeDiscord,
)
from model_doubles import GatedModel
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from tcp_proxy import TcpProxy

from adapters.base import AdapterStartError
from adapters.discord import CANNOT_READ, HELP_TEXT, RESET_DONE, DiscordAdapter
from bot.chat_model import Generated
from bot.engine import ReplyEngine
from bot.errors import ConversationBusy, EngineBusy, GenerationFailed
from bot.memory import open_store
from bot.shared import RedisRateLimiter, connect
from bot.text import clean_text
from bot.web import build_app

MENTION = f"<@{BOT_ID}>"


@dataclass
class RunningBot:
    adapter: DiscordAdapter
    engine: ReplyEngine
    model: GatedModel

    def model_saw(self) -> list[str]:
        """The last user turn of every conversation the model was asked to answer."""
        return [turns[-1] for batch in self.model.batches for turns in batch]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_bot(fake, tiny_model, make_settings) -> AsyncIterator[Callable[..., Awaitable[RunningBot]]]:
    """Start a bot (adapter + engine over the tiny model) against `fake`; stopped after the test."""
    running: list[tuple[DiscordAdapter, ReplyEngine]] = []

    async def start(*, model=None, limiter=None, **overrides) -> RunningBot:
        endpoints = {"discord_api_url": fake.api_url, "discord_gateway_url": fake.gateway_url}
        settings = make_settings(**{"discord_token": fake.token, **endpoints, **overrides})
        model = model or GatedModel(tiny_model)
        store = open_store("memory://", max_turns=settings.memory_max_turns)
        engine = ReplyEngine(model, store, settings, limiter=limiter)
        await engine.start()
        adapter = DiscordAdapter(settings, engine)
        running.append((adapter, engine))
        await adapter.start()
        return RunningBot(adapter, engine, model)

    yield start
    for adapter, engine in reversed(running):
        adapter.stop_accepting()
        await adapter.drain(10)
        await adapter.close()
        await engine.close()


@pytest.fixture
async def bot(start_bot) -> RunningBot:
    return await start_bot()


async def answer_to(fake: FakeDiscord, content: str, *, channel_id: int = CHANNEL_ID, **message) -> tuple[int, list]:
    """Send a message and wait for the bot's first message in that channel after it."""
    before = len(fake.created(channel_id))
    message_id = await fake.send_message(content, channel_id=channel_id, **message)
    await fake.wait_for(lambda: len(fake.created(channel_id)) > before, what=f"a reply in {channel_id}")
    return message_id, fake.created(channel_id)[before:]


async def settle(fake: FakeDiscord, channel_id: int = OTHER_CHANNEL_ID) -> None:
    """Mention the bot in another channel and wait for that answer. Gateway events are
    handled in order, so anything the bot was going to do about earlier messages has
    started by then: the typing indicator goes out before the model is even asked."""
    await answer_to(fake, f"{MENTION} are you still there?", channel_id=channel_id, mentions=(BOT_ID,))


# -- answering -------------------------------------------------------------


async def test_mention_gets_exactly_one_reply_referencing_it(fake, bot):
    message_id, replies = await answer_to(fake, f"{MENTION} hello there, how are you?", mentions=(BOT_ID,))
    await settle(fake)

    calls = fake.touching(CHANNEL_ID)
    assert [(c.method, c.path.rsplit("/", 1)[-1]) for c in calls] == [("POST", "typing"), ("POST", "messages")]
    assert len(fake.created(CHANNEL_ID)) == 1  # its own echoed message got nothing
    sent = replies[0].json
    assert sent["content"].strip()
    assert int(sent["message_reference"]["message_id"]) == message_id
    assert sent["allowed_mentions"]["parse"] == []
    assert not sent["allowed_mentions"].get("replied_user")
    assert bot.model_saw()[0] == "hello there, how are you?"
    assert bot.adapter.connected
    # Non-privileged intents only: guilds, guild messages, guild reactions, DMs, DM reactions.
    assert fake.identifies[0]["intents"] == (1 << 0) | (1 << 9) | (1 << 10) | (1 << 12) | (1 << 13)
    assert not fake.identifies[0]["intents"] & MESSAGE_CONTENT_INTENT


async def test_nickname_mention_form_works(fake, bot):
    message_id, replies = await answer_to(fake, f"<@!{BOT_ID}> what's up?", mentions=(BOT_ID,))
    assert int(replies[0].json["message_reference"]["message_id"]) == message_id
    assert bot.model_saw() == ["what's up?"]


async def test_other_mentions_become_display_names(fake, bot):
    await answer_to(
        fake,
        f"{MENTION} say hi to <@{OTHER_USER_ID}> and <@!{USER_ID}> from <@&{ROLE_ID}> in <#{OTHER_CHANNEL_ID}>",
        mentions=(BOT_ID, OTHER_USER_ID, USER_ID),
        mention_roles=(ROLE_ID,),
    )
    assert bot.model_saw() == ["say hi to Bobby Tables and Alice Liddell from helpers in #random"]


async def test_dm_is_answered_without_a_mention(fake, bot):
    message_id, replies = await answer_to(fake, "hi, can we talk in private?", channel_id=DM_CHANNEL_ID)
    assert int(replies[0].json["message_reference"]["message_id"]) == message_id
    assert await bot.engine.history(f"discord:{DM_CHANNEL_ID}")


async def test_dms_can_be_turned_off(fake, start_bot):
    bot = await start_bot(discord_dms=False)
    await fake.send_message("hello?", channel_id=DM_CHANNEL_ID)
    await fake.send_message(f"{MENTION} hello?", channel_id=DM_CHANNEL_ID, mentions=(BOT_ID,))
    await settle(fake)
    assert fake.touching(DM_CHANNEL_ID) == []
    assert "hello?" not in bot.model_saw()


async def test_reply_to_the_bot_is_answered_without_a_mention(fake, bot):
    _, first = await answer_to(fake, f"{MENTION} tell me a story", mentions=(BOT_ID,))
    bot_message = int(first[0].response["id"])
    message_id, replies = await answer_to(fake, "and then what happened?", reply_to=bot_message)
    assert int(replies[0].json["message_reference"]["message_id"]) == message_id
    assert bot.model_saw()[-1] == "and then what happened?"


async def test_unreadable_reply_gets_a_hint_instead_of_silence(fake, bot):
    # Without the Message Content intent, a reply that does not @mention the bot arrives blank.
    _, first = await answer_to(fake, f"{MENTION} tell me a story", mentions=(BOT_ID,))
    _, replies = await answer_to(fake, "", reply_to=int(first[0].response["id"]))
    assert replies[0].json["content"] == CANNOT_READ
    assert len(bot.model.batches) == 1


async def test_messages_not_addressed_to_the_bot_get_nothing(fake, bot):
    human = await fake.send_message("just chatting among humans")
    await fake.send_message("@everyone meeting in five minutes", mention_everyone=True)
    await fake.send_message("@here anyone around?", mention_everyone=True)
    await fake.send_message(f"<@&{ROLE_ID}> please review", mention_roles=(ROLE_ID,))
    await fake.send_message(f"{MENTION} I am another bot", author_id=OTHER_BOT_ID, mentions=(BOT_ID,))
    await fake.send_message(f"{MENTION} I am a webhook", webhook=True, mentions=(BOT_ID,))
    await fake.send_message(f"{MENTION} talking to myself", author_id=BOT_ID, mentions=(BOT_ID,))
    await fake.send_message("replying to a human, not the bot", reply_to=human)
    await fake.send_message(f"{MENTION} pinned a message", mentions=(BOT_ID,), message_type=6)
    await settle(fake)

    assert fake.touching(CHANNEL_ID) == []
    assert bot.model_saw() == ["are you still there?"]


async def test_allow_lists_limit_where_the_bot_answers(fake, start_bot):
    bot = await start_bot(discord_channel_ids=frozenset({str(CHANNEL_ID)}))
    await answer_to(fake, f"{MENTION} in the allowed channel", mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} in its thread", channel_id=THREAD_ID, mentions=(BOT_ID,))
    await fake.send_message(f"{MENTION} in another channel", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    await settle(fake, channel_id=CHANNEL_ID)
    assert fake.touching(OTHER_CHANNEL_ID) == []
    assert "in another channel" not in bot.model_saw()


async def test_guild_allow_list_excludes_other_servers(fake, start_bot):
    bot = await start_bot(discord_guild_ids=frozenset({str(GUILD_ID + 1)}))
    await fake.send_message(f"{MENTION} hello from an unlisted server", mentions=(BOT_ID,))
    await settle(fake, channel_id=DM_CHANNEL_ID)  # DMs are not bound by the server list
    assert fake.touching(CHANNEL_ID) == []
    assert bot.model_saw() == ["are you still there?"]


# -- memory and reset ------------------------------------------------------


async def test_each_channel_and_thread_has_its_own_memory(fake, bot):
    await answer_to(fake, f"{MENTION} my name is Alice", mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} what is my name?", mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} I like cheese", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} a thread of our own", channel_id=THREAD_ID, mentions=(BOT_ID,))

    general = await bot.engine.history(f"discord:{CHANNEL_ID}")
    assert [exchange.user for exchange in general] == ["my name is Alice", "what is my name?"]
    assert [e.user for e in await bot.engine.history(f"discord:{OTHER_CHANNEL_ID}")] == ["I like cheese"]
    assert [e.user for e in await bot.engine.history(f"discord:{THREAD_ID}")] == ["a thread of our own"]
    # The second question in #general was asked with the first exchange before it.
    second_call = [turns for batch in bot.model.batches for turns in batch if turns[-1] == "what is my name?"]
    assert second_call[0][:2] == ["my name is Alice", general[0].bot]
    cheese_call = [turns for batch in bot.model.batches for turns in batch if turns[-1] == "I like cheese"]
    assert cheese_call == [["I like cheese"]]


@pytest.mark.parametrize("word", ["reset", "Forget"])
async def test_reset_by_mention_forgets_the_channel(fake, bot, word):
    await answer_to(fake, f"{MENTION} remember that I like tea", mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} hello", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    calls_before = len(bot.model.batches)

    message_id, replies = await answer_to(fake, f"{MENTION} {word}", mentions=(BOT_ID,))

    assert replies[0].json["content"] == RESET_DONE
    assert int(replies[0].json["message_reference"]["message_id"]) == message_id
    assert await bot.engine.history(f"discord:{CHANNEL_ID}") == []
    assert len(await bot.engine.history(f"discord:{OTHER_CHANNEL_ID}")) == 1
    assert len(bot.model.batches) == calls_before  # no generation for a command


async def test_slash_reset_forgets_and_confirms(fake, bot):
    assert {command["name"] for command in fake.commands} == {"reset", "help", "Ask BlenderBot", "blenderbot"}
    await answer_to(fake, f"{MENTION} remember that I like tea", mentions=(BOT_ID,))

    interaction = await fake.slash_command("reset")

    def followups() -> list:
        return [c for c in fake.calls if c.path.startswith("/webhooks/") and str(interaction) in c.path]

    await fake.wait_for(followups, what="the /reset follow-up")

    callback = next(c for c in fake.calls if c.path.startswith(f"/interactions/{interaction}/"))
    assert callback.json["type"] == 5  # deferred: resetting may wait for a reply in flight
    assert followups()[0].json["content"] == RESET_DONE
    assert await bot.engine.history(f"discord:{CHANNEL_ID}") == []


async def test_slash_help_explains_the_bot(fake, bot):
    interaction = await fake.slash_command("help", channel_id=THREAD_ID)
    callbacks = lambda: [c for c in fake.calls if c.path.startswith(f"/interactions/{interaction}/")]  # noqa: E731
    await fake.wait_for(callbacks, what="the /help answer")
    answer = callbacks()[0].json
    assert answer["type"] == 4
    assert answer["data"]["content"] == HELP_TEXT
    assert answer["data"]["flags"] & EPHEMERAL
    assert answer["data"]["allowed_mentions"]["parse"] == []


async def test_slash_commands_respect_the_allow_list(fake, start_bot):
    bot = await start_bot(discord_channel_ids=frozenset({str(OTHER_CHANNEL_ID)}))
    await answer_to(fake, f"{MENTION} remember me", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    interaction = await fake.slash_command("reset", channel_id=CHANNEL_ID)
    callbacks = lambda: [c for c in fake.calls if c.path.startswith(f"/interactions/{interaction}/")]  # noqa: E731
    await fake.wait_for(callbacks, what="the refusal")
    assert callbacks()[0].json["data"]["flags"] & EPHEMERAL
    assert "not enabled here" in callbacks()[0].json["data"]["content"]
    assert len(await bot.engine.history(f"discord:{OTHER_CHANNEL_ID}")) == 1


# -- long answers, failures, rate limits, reconnects -------------------------


class LongAnswers:
    """The real tiny model, its answers padded to about 5,000 characters of prose."""

    def __init__(self, model) -> None:
        self.model = model

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        results = self.model.generate(conversations, sample=sample, personas=personas)
        return [Generated(_pad(result.text), result.new_tokens) for result in results]


def _pad(text: str) -> str:
    """About 5,000 characters of sentences, then the model's own (random) words."""
    paragraphs: list[str] = []
    while sum(len(p) + 2 for p in paragraphs) < 5000:
        number = len(paragraphs) + 1
        paragraphs.append(" ".join(f"Sentence {number}.{i} goes on for a while to make this long." for i in range(6)))
    return "\n\n".join(paragraphs) + "\n\n" + text


async def test_a_5000_character_answer_arrives_in_ordered_chunks(fake, start_bot, tiny_model):
    bot = await start_bot(model=GatedModel(LongAnswers(tiny_model)))
    message_id, _ = await answer_to(fake, f"{MENTION} tell me everything", mentions=(BOT_ID,))
    [exchange] = await bot.engine.history(f"discord:{CHANNEL_ID}")
    assert len(exchange.bot) >= 5000

    def all_chunks() -> list | None:
        chunks = fake.created(CHANNEL_ID)
        return chunks if sum(len(chunk.json["content"]) for chunk in chunks) >= 4900 else None

    chunks = await fake.wait_for(all_chunks, what="every chunk")
    contents = [chunk.json["content"] for chunk in chunks]
    assert len(contents) == 3
    assert all(len(content) <= 2000 for content in contents)
    assert " ".join(contents).split() == clean_text(exchange.bot).split()  # every word, in order
    assert all(content.endswith(".") for content in contents[:-1])  # cut at sentence ends
    assert int(chunks[0].json["message_reference"]["message_id"]) == message_id
    assert all(chunk.json["allowed_mentions"]["parse"] == [] for chunk in chunks)


async def test_model_failure_gets_a_short_apology(fake, bot):
    bot.model.failures = 1
    _, replies = await answer_to(fake, f"{MENTION} hello", mentions=(BOT_ID,))
    assert replies[0].json["content"] == GenerationFailed.user_message
    assert "Traceback" not in replies[0].json["content"]


async def test_too_long_input_gets_a_clear_answer(fake, start_bot):
    await start_bot(max_input_chars=50)
    _, replies = await answer_to(fake, f"{MENTION} {'very ' * 40}long", mentions=(BOT_ID,))
    assert "too long" in replies[0].json["content"]
    assert "at most 50 characters" in replies[0].json["content"]


async def test_a_429_is_survived_with_exactly_one_message(fake, bot):
    fake.rate_limit("POST", f"/channels/{CHANNEL_ID}/messages", retry_after=0.3)
    message_id, replies = await answer_to(fake, f"{MENTION} are you rate limited?", mentions=(BOT_ID,))
    await settle(fake)

    posts = [c for c in fake.touching(CHANNEL_ID) if c.path.endswith("/messages")]
    assert [c.status for c in posts] == [429, 200]
    assert len(fake.created(CHANNEL_ID)) == 1
    assert int(replies[0].json["message_reference"]["message_id"]) == message_id


async def test_gateway_close_4000_resumes_and_keeps_answering(fake, bot):
    await answer_to(fake, f"{MENTION} before the drop", mentions=(BOT_ID,))
    await fake.close_gateway(4000)
    await fake.wait_for(lambda: fake.resumes, what="a RESUME")
    await fake.wait_for(lambda: bot.adapter.connected, what="connected again")

    _, replies = await answer_to(fake, f"{MENTION} after the drop", mentions=(BOT_ID,))
    assert replies[0].json["content"].strip()
    assert len(fake.identifies) == 1  # resumed, not a new session
    assert fake.resumes[0]["session_id"]
    assert [e.user for e in await bot.engine.history(f"discord:{CHANNEL_ID}")] == ["before the drop", "after the drop"]


async def test_shutdown_refuses_new_messages_and_finishes_replies_in_flight(fake, bot):
    bot.model.gate.clear()
    await fake.send_message(f"{MENTION} answer me before you go", mentions=(BOT_ID,))
    await fake.wait_for(lambda: bot.model.batches, what="generation to start")

    bot.adapter.stop_accepting()
    await fake.send_message(f"{MENTION} too late", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    bot.model.gate.set()
    assert await bot.adapter.drain(30)

    assert len(fake.created(CHANNEL_ID)) == 1
    assert fake.touching(OTHER_CHANNEL_ID) == []
    assert "too late" not in bot.model_saw()


async def test_sharded_client_identifies_its_shard_and_answers(fake, start_bot):
    bot = await start_bot(discord_shard_count=2, discord_shard_ids=(0,))
    await answer_to(fake, f"{MENTION} hello, shard", mentions=(BOT_ID,))
    assert [identify["shard"] for identify in fake.identifies] == [[0, 2]]
    assert {command["name"] for command in fake.commands} == {"reset", "help", "Ask BlenderBot", "blenderbot"}  # shard 0 does
    assert bot.adapter.connected


# -- start-up failures -----------------------------------------------------


async def test_invalid_token_fails_start_with_one_clear_line(fake, start_bot):
    with pytest.raises(AdapterStartError) as failure:
        await start_bot(discord_token="a-wrong-token")
    message = str(failure.value)
    assert message.startswith("DISCORD_TOKEN was rejected by Discord:")
    assert "\n" not in message
    assert "a-wrong-token" not in message  # the secret is never shown
    assert [(c.path, c.status) for c in fake.calls] == [("/users/@me", 401)]
    assert fake.identifies == []


async def test_privileged_intent_not_enabled_fails_start_with_where_to_enable_it(fake, start_bot):
    fake.reject_identify_with = 4014
    with pytest.raises(AdapterStartError) as failure:
        await start_bot(discord_message_content=True)
    message = str(failure.value)
    assert "Privileged Gateway Intents" in message
    assert "https://discord.com/developers/applications" in message
    assert "DISCORD_MESSAGE_CONTENT" in message
    assert "\n" not in message
    assert fake.identifies[0]["intents"] & MESSAGE_CONTENT_INTENT


async def test_two_clients_in_one_process_keep_their_own_endpoints(fake, start_bot, tiny_model, make_settings):
    other = FakeDiscord()
    await other.start()
    try:
        await start_bot()
        settings = make_settings(
            discord_token=other.token, discord_api_url=other.api_url, discord_gateway_url=other.gateway_url
        )
        engine = ReplyEngine(tiny_model, open_store("memory://", max_turns=5), settings)
        await engine.start()
        second = DiscordAdapter(settings, engine)
        try:
            await second.start()
            await answer_to(fake, f"{MENTION} first fake", mentions=(BOT_ID,))
            await answer_to(other, f"{MENTION} second fake", mentions=(BOT_ID,))
        finally:
            await second.close()
            await engine.close()
        assert len(fake.identifies) == len(other.identifies) == 1
        assert [c.json["content"] for c in fake.created()] and [c.json["content"] for c in other.created()]
    finally:
        await other.stop()


# -- `blender-chat run` as a subprocess ---------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_env(fake: FakeDiscord, blenderbot_dir, tmp_path, port: int) -> dict[str, str]:
    return subprocess_env(
        DISCORD_TOKEN=fake.token,
        DISCORD_API_URL=fake.api_url,
        DISCORD_GATEWAY_URL=fake.gateway_url,
        BLENDERBOT_MODEL=str(blenderbot_dir),
        BLENDERBOT_MAX_NEW_TOKENS="8",
        BLENDERBOT_NUM_BEAMS="1",
        MEMORY_URL=f"sqlite:///{tmp_path}/memory.db",
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(port),
        SHUTDOWN_GRACE="5",
    )


@pytest.mark.timeout(180)
async def test_blender_chat_run_answers_discord_through_the_configured_urls(fake, blenderbot_dir, tmp_path):
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run",
        env=_run_env(fake, blenderbot_dir, tmp_path, port), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError("blender-chat run exited early: " + (await process.stdout.read()).decode())
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            for _ in range(1200):
                if await ready():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("blender-chat run never became ready")

        message_id, replies = await answer_to(fake, f"{MENTION} hello from the outside", mentions=(BOT_ID,))
        assert int(replies[0].json["message_reference"]["message_id"]) == message_id
        assert replies[0].json["allowed_mentions"]["parse"] == []
        assert fake.identifies and fake.commands

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        log = (await process.stdout.read()).decode()
        assert "Running: discord" in log
        assert "voice will NOT be supported" not in log  # the bot has no voice: no warnings about its libraries
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.timeout(180)
async def test_blender_chat_run_exits_non_zero_on_a_rejected_token(fake, blenderbot_dir, tmp_path):
    fake.token = "the-real-token"
    env = _run_env(fake, blenderbot_dir, tmp_path, _free_port())
    env["DISCORD_TOKEN"] = "a-wrong-token"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode != 0
    lines = [line for line in stderr.decode().splitlines() if "DISCORD_TOKEN was rejected by Discord" in line]
    assert lines, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert "a-wrong-token" not in stderr.decode()


# -- order, fairness, forwards, a token reset after start-up --------------------------


@pytest.fixture
async def slow_redis(redis_url):
    """A client of the test Redis through a TCP proxy that can slow a command down; keys on a prefix of this test."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    prefix = unique_prefix()
    client = connect(proxy.url())
    yield proxy, client, prefix
    await client.aclose()
    await proxy.close()
    delete_prefix(redis_url, prefix)


async def test_a_slow_rate_limit_call_or_typing_post_neither_reorders_nor_delays_answers(fake, start_bot, slow_redis):
    proxy, client, prefix = slow_redis
    bot = await start_bot(limiter=RedisRateLimiter(client, burst=5, per_minute=60, prefix=prefix))  # shared buckets
    proxy.delay_next(b"EVALSHA", 1.5)  # the first message's rate-limit check waits on a slow network
    fake.delay("POST", f"/channels/{CHANNEL_ID}/typing", 60)  # and so does its "typing..."
    first = await fake.send_message(f"{MENTION} my name is Ada", mentions=(BOT_ID,))
    second = await fake.send_message(f"{MENTION} what is my name?", mentions=(BOT_ID,))
    await fake.wait_for(lambda: len(fake.created(CHANNEL_ID)) == 2, what="both answers")
    assert fake.held == 1  # answered while the first typing POST was still on its way: nobody waited for it
    history = await bot.engine.history(f"discord:{CHANNEL_ID}")
    assert [exchange.user for exchange in history] == ["my name is Ada", "what is my name?"]
    prompts = [turns for batch in bot.model.batches for turns in batch]
    assert prompts[1][:2] == ["my name is Ada", history[0].bot]  # the second saw the first
    answers = [int(call.json["message_reference"]["message_id"]) for call in fake.created(CHANNEL_ID)]
    assert answers == [first, second]  # and the answers went out in that order


async def test_a_flood_in_one_channel_leaves_another_channel_answered(fake, start_bot):
    """#general floods the bot with 30 mentions while it is busy: it takes the first
    CONVERSATION_QUEUE_SIZE (8) of them, tells the channel once to wait, and a
    mention in #random still gets a real answer instead of "busy"."""
    bot = await start_bot(queue_size=10)
    bot.model.gate.clear()  # the model holds its first call: everything else waits
    flood = [await fake.send_message(f"{MENTION} flood {i}", mentions=(BOT_ID,)) for i in range(30)]
    notice = await fake.wait_for(lambda: fake.created(CHANNEL_ID), what="the notice to wait")
    assert [call.json["content"] for call in notice] == [ConversationBusy.user_message]
    assert int(notice[0].json["message_reference"]["message_id"]) == flood[8]

    def refused() -> float:
        return bot.engine.metrics.registry.get_sample_value(
            "blenderchat_replies_total", {"platform": "discord", "outcome": "conversation_busy"}) or 0  # fmt: skip

    await fake.wait_for(lambda: refused() == 22, what="the rest of the flood refused, silently")
    other = await fake.send_message(f"{MENTION} hello from #random", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    await fake.wait_for(lambda: bot.engine.metrics.registry.get_sample_value("blenderchat_queue_depth") == 9,
                        what="#random's message in the queue")  # fmt: skip
    bot.model.gate.set()

    [answer] = await fake.wait_for(lambda: fake.created(OTHER_CHANNEL_ID), what="the answer in #random")
    assert int(answer.json["message_reference"]["message_id"]) == other
    assert answer.json["content"] not in (EngineBusy.user_message, ConversationBusy.user_message)
    await fake.wait_for(lambda: len(fake.created(CHANNEL_ID)) == 9, what="the eight answers in #general")
    replied_to = [int(call.json["message_reference"]["message_id"]) for call in fake.created(CHANNEL_ID)]
    assert replied_to == [flood[8], *flood[:8]]  # the notice, then the first eight in order
    history = await bot.engine.history(f"discord:{CHANNEL_ID}")
    assert [exchange.user for exchange in history] == [f"flood {i}" for i in range(8)]
    assert [e.user for e in await bot.engine.history(f"discord:{OTHER_CHANNEL_ID}")] == ["hello from #random"]


async def test_a_forward_of_the_bots_message_is_not_answered(fake, bot):
    _, first = await answer_to(fake, f"{MENTION} tell me a story", mentions=(BOT_ID,))
    bot_message = int(first[0].response["id"])
    await fake.send_message("", forward_of=bot_message)  # into the same channel
    await fake.send_message("", channel_id=OTHER_CHANNEL_ID, forward_of=bot_message)
    await fake.send_message("", channel_id=DM_CHANNEL_ID, forward_of=bot_message)
    await settle(fake, channel_id=THREAD_ID)
    assert len(fake.created(CHANNEL_ID)) == 1 and fake.touching(OTHER_CHANNEL_ID) == []
    assert fake.touching(DM_CHANNEL_ID) == []
    assert bot.model_saw() == ["tell me a story", "are you still there?"]
    # A reply to it still counts.
    _, replies = await answer_to(fake, "and then?", reply_to=bot_message)
    assert replies and bot.model_saw()[-1] == "and then?"


@pytest.mark.parametrize("word", ["forget!", "Reset."])
async def test_reset_words_are_matched_as_on_slack(fake, bot, word):
    await answer_to(fake, f"{MENTION} remember that I like tea", mentions=(BOT_ID,))
    _, replies = await answer_to(fake, f"{MENTION} {word}", mentions=(BOT_ID,))
    assert replies[0].json["content"] == RESET_DONE
    assert await bot.engine.history(f"discord:{CHANNEL_ID}") == []


async def test_a_token_reset_after_start_up_fails_healthz_with_one_line(fake, bot, caplog):
    settings = bot.adapter.settings
    client = TestClient(TestServer(build_app(bot.engine, settings, [bot.adapter]), host="127.0.0.1", port=0))
    await client.start_server()
    try:
        assert (await client.get("/healthz")).status == 200
        await fake.close_gateway(4000)  # a hiccup: the client resumes, /healthz never notices
        await fake.wait_for(lambda: fake.resumes, what="a RESUME")
        await fake.wait_for(lambda: bot.adapter.connected, what="connected again")
        assert (await client.get("/healthz")).status == 200 and (await client.get("/readyz")).status == 200

        await fake.close_gateway(4004)  # the token was reset in the developer portal
        await fake.wait_for(lambda: bot.adapter.failure, what="the adapter to give up")
        response = await client.get("/healthz")
        body = await response.json()
        assert response.status == 503 and body["status"] == "failed"
        assert body["reason"].startswith("discord: DISCORD_TOKEN was rejected by Discord")
        assert (await client.get("/readyz")).status == 503
        lines = [r for r in caplog.records if r.levelname == "ERROR" and "Discord stopped for good" in r.message]
        assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    finally:
        await client.close()
