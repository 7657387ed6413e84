""""Try again" (issue 21, item 4): another, sampled answer to the latest message,
shown in place of the old one and stored in its place. Through the engine, every
memory backend (SQLite, Redis, in-process), the web API over real HTTP, the
terminal chat, Discord (the real discord.py client against tests/fake_discord.py:
a 🔁 reaction, the answer edited with PATCH) and Slack (the real slack_bolt against
tests/fake_slack.py: a "Try again" button, the answer edited with chat.update).

The model is the tiny one wrapped by `Takes`, which numbers every answer and says
whether it was sampled, so a test knows which answer it sees without depending on
what the random model says."""

from __future__ import annotations

import asyncio
import io
import itertools
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from bot_process import sample
from fake_discord import BOT_ID, CHANNEL_ID, OTHER_USER_ID, FakeDiscord
from fake_slack import FakeSlack, block_actions, dm, event_body, wait_for
from model_doubles import GatedModel
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from test_discord import MENTION, answer_to
from test_discord_app import eventually
from test_memory import backend, make_store  # noqa: F401 (fixtures)
from test_slack import SECRET
from test_slack import Bot as SlackBot
from test_slack_surface import click

from adapters.discord import DiscordAdapter
from adapters.slack import SlackAdapter
from adapters.slack_surface import AGAIN_ACTION, AGAIN_LABEL
from bot.chat import HELP, chat
from bot.chat_model import Generated
from bot.engine import ReplyEngine
from bot.errors import AnswerGone, NoOtherAnswer, NotLatest, RateLimited
from bot.memory import ExchangeRef, Feedback, open_store
from bot.ratelimit import TokenBucketLimiter
from bot.web import STATE, build_app


class Takes(GatedModel):
    """The tiny model, whose answers become "take N: <the message>" by beam search and
    "sampled take N: <the message>" when sampled (N counts every answer). `same` makes
    a sampled answer the text last given to that message; `unsafe` makes it something
    the safety filter blocks."""

    def __init__(self, model, *, same: bool = False, unsafe: bool = False) -> None:
        super().__init__(model)
        self._count = itertools.count(1)
        self._last: dict[str, str] = {}  # message -> the last answer given to it
        self.same, self.unsafe = same, unsafe

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        results = super().generate(conversations, sample=sample, personas=personas)
        return [Generated(self._text(turns[-1], sample), result.new_tokens)
                for result, turns in zip(results, conversations)]

    def _text(self, message: str, sample: bool) -> str:
        if sample and self.unsafe:
            return "you are a fucking idiot"
        if not (sample and self.same and message in self._last):
            self._last[message] = f" {'sampled ' if sample else ''}take {next(self._count)}: {message}"
        return self._last[message]


def rating(exchange: ExchangeRef, value: str = "bad", user: str = "U1") -> Feedback:
    return Feedback(exchange, value, user, "web", 1.0)


# -- the store: every backend keeps the exchange's place --------------------------------


async def test_replace_exchange_keeps_its_place_and_user_text_and_leaves_ratings_with_the_old_id(store):
    first = await store.append_exchange("c", "hello", " hi")
    second = await store.append_exchange("c", "and you?", " fine")
    third = await store.append_exchange("c", "bye", " see you")
    assert await store.add_feedback(rating(ExchangeRef("c", second.id)))

    new = await store.replace_exchange("c", second.id, " great, thanks", new_id="new-id")
    assert (new.user, new.bot, new.id) == ("and you?", " great, thanks", "new-id") and new.at >= second.at
    assert await store.history("c") == [first, new, third]
    # The rating of the old answer is kept, under the old id; it is not the new answer's.
    [row] = await store.list_feedback()
    assert (row.exchange, row.rating) == (ExchangeRef("c", second.id), "bad")
    assert not await store.add_feedback(rating(ExchangeRef("c", second.id), "good", user="U2"))  # gone
    assert await store.add_feedback(rating(ExchangeRef("c", "new-id"), "good", user="U2"))
    # A repeated call (a retried command) finds it done; an unknown id or conversation changes nothing.
    assert await store.replace_exchange("c", second.id, " other", new_id="new-id") == new
    assert await store.replace_exchange("c", "no-such-id", " other", new_id="x") is None
    assert await store.replace_exchange("other", first.id, " other", new_id="y") is None
    assert await store.history("c") == [first, new, third]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_replaced_exchange_survives_reopening_the_store(make_store):
    first = await make_store(max_turns=10)
    exchange = await first.append_exchange("c", "hello", " hi")
    more = await first.append_exchange("c", "more", " yes")
    await first.replace_exchange("c", exchange.id, " hello to you ✨", new_id="again")
    await first.close()
    second = await make_store(max_turns=10)
    assert [(e.id, e.user, e.bot) for e in await second.history("c")] == [
        ("again", "hello", " hello to you ✨"), (more.id, "more", " yes")]


@pytest.fixture
async def store(make_store):
    return await make_store()


# -- the engine: one way to do it ----------------------------------------------------------


@pytest.fixture
async def make_engine(tiny_model, make_settings):
    engines: list[ReplyEngine] = []

    async def make(model=None, **overrides) -> ReplyEngine:
        settings = make_settings(**overrides)
        engine = ReplyEngine(model or Takes(tiny_model), open_store("memory://", max_turns=5), settings)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close(timeout=5)


async def test_retry_samples_a_new_answer_to_the_same_message_and_replaces_the_exchange(make_engine, tiny_model):
    model = Takes(tiny_model)
    engine = await make_engine(model)
    first = await engine.respond("c", "hello", user="u")
    latest = await engine.respond("c", "how are you?", user="u")
    assert latest.text == "take 2: how are you?"
    assert await engine.rate(latest.exchange, "bad", user="u", platform="web")

    again = await engine.retry("c", latest.exchange.id, user="u", platform="web")
    assert again.text == "sampled take 3: how are you?"
    assert again.exchange.conversation == "c" and again.exchange.id != latest.exchange.id
    # Sampled, from the same turns the first answer saw.
    assert model.samples[-1] is True and model.batches[-1] == model.batches[-2] == [
        ["hello", " take 1: hello", "how are you?"]]
    history = await engine.history("c")
    assert [(e.id, e.user, e.bot) for e in history] == [
        (first.exchange.id, "hello", " take 1: hello"),
        (again.exchange.id, "how are you?", " sampled take 3: how are you?"),
    ]
    assert history[1].at == again.at
    # The next message sees the new answer.
    await engine.respond("c", "nice", user="u")
    assert model.batches[-1][0][:4] == ["hello", " take 1: hello", "how are you?", " sampled take 3: how are you?"]
    # The bad rating stays with the answer it was given to, not the new one.
    [row] = await engine.store.list_feedback()
    assert row.exchange == latest.exchange
    assert not await engine.rate(latest.exchange, "good", user="u2", platform="web")


async def test_retry_on_an_older_or_unknown_answer_is_refused_and_changes_nothing(make_engine):
    engine = await make_engine()
    older = await engine.respond("c", "hello", user="u")
    await engine.respond("c", "how are you?", user="u")
    before = await engine.history("c")
    with pytest.raises(NotLatest) as refused:
        await engine.retry("c", older.exchange.id, user="u")
    assert refused.value.user_message == "I can only redo my latest answer in this conversation."
    with pytest.raises(AnswerGone):
        await engine.retry("c", "no-such-exchange", user="u")
    with pytest.raises(AnswerGone):
        await engine.retry("empty", older.exchange.id, user="u")
    assert await engine.history("c") == before


@pytest.mark.parametrize("kind", ["same", "unsafe"])
async def test_retry_without_a_safe_different_answer_keeps_the_old_one(make_engine, tiny_model, kind):
    model = Takes(tiny_model, **{kind: True})
    engine = await make_engine(model)
    reply = await engine.respond("c", "hello", user="u")
    with pytest.raises(NoOtherAnswer) as refused:
        await engine.retry("c", reply.exchange.id, user="u")
    assert "different answer" in refused.value.user_message
    assert model.samples[1:] == [True, True]  # tried twice, sampling
    [kept] = await engine.history("c")
    assert (kept.id, kept.bot) == (reply.exchange.id, " take 1: hello")


async def test_retry_counts_against_the_rate_limit_like_a_message(make_engine, tiny_model, make_settings):
    settings = make_settings()
    limiter = TokenBucketLimiter(burst=2, per_minute=1)
    engine = ReplyEngine(Takes(tiny_model), open_store("memory://", max_turns=5), settings, limiter=limiter)
    async with engine:
        reply = await engine.respond("c", "hello", user="u")
        again = await engine.retry("c", reply.exchange.id, user="u")
        with pytest.raises(RateLimited):
            await engine.retry("c", again.exchange.id, user="u", platform="discord")
        [kept] = await engine.history("c")
        assert kept.id == again.exchange.id
        exposition = engine.metrics.render().decode()
        assert sample(exposition, "blenderchat_retries_total", platform="api", outcome="ok") == 1
        assert sample(exposition, "blenderchat_retries_total", platform="discord", outcome="rate_limited") == 1


async def test_retries_wait_their_turn_in_the_conversation_and_the_second_finds_the_answer_redone(
    make_engine, tiny_model
):
    model = Takes(tiny_model)
    engine = await make_engine(model)
    reply = await engine.respond("c", "hello", user="u")
    model.gate.clear()  # the first retry holds the model
    first = asyncio.create_task(engine.retry("c", reply.exchange.id, user="u"))
    second = asyncio.create_task(engine.retry("c", reply.exchange.id, user="u"))
    await asyncio.to_thread(model.wait_for_calls, 2)
    await asyncio.sleep(0.2)
    assert len(model.batches) == 2  # the second waits in line: one at a time per conversation
    model.gate.set()
    again = await first
    with pytest.raises(AnswerGone):
        await second
    [kept] = await engine.history("c")
    assert kept.id == again.exchange.id


# -- the web API, over real HTTP -----------------------------------------------------------


@pytest.fixture
async def serve(tiny_model, make_settings, tmp_path):
    """The web app over a real engine on SQLite and the `Takes` model, on a real port."""
    opened: list[TestClient] = []

    async def start(**overrides) -> TestClient:
        settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db", **overrides)
        engine = ReplyEngine(Takes(tiny_model), open_store(settings.memory_url, max_turns=5), settings)
        await engine.start()
        client = TestClient(TestServer(build_app(engine, settings), host="127.0.0.1", port=0))
        await client.start_server()
        opened.append(client)
        return client

    yield start
    for client in opened:
        engine = client.server.app[STATE].engine
        await client.close()
        await engine.close(timeout=5)


async def post(client: TestClient, path: str, body: dict, **headers: str) -> tuple[int, dict]:
    response = await client.post(path, json=body, headers=headers)
    return response.status, await response.json()


async def test_web_again_replaces_the_latest_answer_and_refuses_an_older_one(serve, tmp_path):
    client = await serve()
    _, first = await post(client, "/api/chat", {"conversation": "w", "text": "hello"})
    _, latest = await post(client, "/api/chat", {"conversation": "w", "text": "how are you?"})
    assert (await post(client, "/api/feedback", {"conversation": "w", "exchange_id": latest["exchange_id"],
                                                 "rating": "bad"}))[0] == 200

    status, again = await post(client, "/api/again", {"conversation": "w", "exchange_id": latest["exchange_id"]})
    assert status == 200 and again["reply"] == "sampled take 3: how are you?"
    assert again["exchange_id"] not in (latest["exchange_id"], None) and isinstance(again["at"], float)
    history = await (await client.get("/api/history", params={"conversation": "w"})).json()
    assert [(e["id"], e["user"], e["bot"]) for e in history["exchanges"]] == [
        (first["exchange_id"], "hello", first["reply"]), (again["exchange_id"], "how are you?", again["reply"])]
    # In the SQLite file itself: the row kept its place; the bad rating stayed with the old answer's id.
    with sqlite3.connect(tmp_path / "memory.db") as db:
        assert db.execute("SELECT exchange_id, bot_text FROM exchanges ORDER BY id").fetchall() == [
            (first["exchange_id"], " take 1: hello"), (again["exchange_id"], " sampled take 3: how are you?")]
        assert db.execute("SELECT exchange_id, rating FROM feedback").fetchall() == [(latest["exchange_id"], "bad")]

    status, refused = await post(client, "/api/again", {"conversation": "w", "exchange_id": first["exchange_id"]})
    assert (status, refused["code"], refused["error"]) == (
        409, "not_latest", "I can only redo my latest answer in this conversation.")
    status, gone = await post(client, "/api/again", {"conversation": "w", "exchange_id": latest["exchange_id"]})
    assert (status, gone["code"]) == (404, "answer_gone") and "redone or forgotten" in gone["error"]
    for body in ({"conversation": "w"}, {"conversation": "w", "exchange_id": "has space"}, {"exchange_id": "x"}):
        status, bad = await post(client, "/api/again", body)
        assert (status, bad["code"]) == (400, "bad_request")
    history_after = await (await client.get("/api/history", params={"conversation": "w"})).json()
    assert history_after == history


async def test_web_again_is_rate_limited_per_caller_like_a_message(serve):
    client = await serve(web_rate_limit_per_minute=2)
    _, reply = await post(client, "/api/chat", {"conversation": "w", "text": "hello"})
    status, again = await post(client, "/api/again", {"conversation": "w", "exchange_id": reply["exchange_id"]})
    assert status == 200
    response = await client.post("/api/again", json={"conversation": "w", "exchange_id": again["exchange_id"]})
    assert response.status == 429 and (await response.json())["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1
    [kept] = (await (await client.get("/api/history", params={"conversation": "w"})).json())["exchanges"]
    assert kept["id"] == again["exchange_id"]


async def test_web_again_needs_the_token_like_the_rest_of_the_api(serve):
    client = await serve(http_host="0.0.0.0", web_api_token="tok")
    auth = {"Authorization": "Bearer tok"}
    _, reply = await post(client, "/api/chat", {"conversation": "w", "text": "hello"}, **auth)
    body = {"conversation": "w", "exchange_id": reply["exchange_id"]}
    assert (await post(client, "/api/again", body))[0] == 401
    assert (await post(client, "/api/again", body, Origin="https://evil.example", **auth))[0] == 403
    assert (await post(client, "/api/again", body, **auth))[0] == 200


# -- the terminal chat -----------------------------------------------------------------------


async def test_terminal_again_redoes_the_last_reply(tiny_model, make_settings, tmp_path, monkeypatch, capsys):
    settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db")
    model = Takes(tiny_model)
    async with ReplyEngine(model, open_store(settings.memory_url, max_turns=5), settings) as engine:
        monkeypatch.setattr("sys.stdin", io.StringIO("/again\nhello\n/again\n/bad\n/quit\n"))
        await chat(engine, "mine")
        said = [line.split("bot> ", 1)[1] for line in capsys.readouterr().out.split(HELP, 1)[1].splitlines()
                if "bot> " in line]
        assert said == ["(no reply to redo yet)", "take 1: hello", "sampled take 2: hello",
                        "(thanks: last reply rated bad)"]
        [exchange] = await engine.history("mine")
        assert (exchange.user, exchange.bot) == ("hello", " sampled take 2: hello")
        [row] = await engine.store.list_feedback()  # /bad rated the new answer
        assert (row.exchange.id, row.platform) == (exchange.id, "terminal")

        # Resumed: the last reply remembered is the one /again redoes; the model has nothing new to say.
        model.same = True
        monkeypatch.setattr("sys.stdin", io.StringIO("/again\n"))
        await chat(engine, "mine")
        assert "bot> (I couldn't come up with a different answer this time. Please try again.)\n" in (
            capsys.readouterr().out.split(HELP, 1)[1])


# -- memory on each backend, for the platforms' tests ------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def memory_url(request, tmp_path) -> Iterator[str]:
    """A real SQLite file, or the real Redis on a key prefix of this test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/memory.db"
        return
    url, prefix = request.getfixturevalue("redis_url"), unique_prefix()
    yield f"{url}?prefix={prefix}"
    delete_prefix(url, prefix)


# -- Discord: 🔁 on the reply, the reply edited ------------------------------------------------

AGAIN = "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}"
THUMBS_UP = "\N{THUMBS UP SIGN}"


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def discord_bot(discord, tiny_model, make_settings):
    """Start the Discord adapter over a real engine, `Takes` and a memory store, against the fake."""
    running: list[tuple[DiscordAdapter, ReplyEngine]] = []

    async def start(memory: str = "memory://", **overrides) -> tuple[DiscordAdapter, ReplyEngine]:
        settings = make_settings(discord_token=discord.token, discord_api_url=discord.api_url,
                                 discord_gateway_url=discord.gateway_url, memory_url=memory, **overrides)
        engine = ReplyEngine(Takes(tiny_model), open_store(memory, max_turns=5), settings)
        await engine.start()
        adapter = DiscordAdapter(settings, engine)
        running.append((adapter, engine))
        await adapter.start()
        return adapter, engine

    yield start
    for adapter, engine in reversed(running):
        adapter.stop_accepting()
        await adapter.drain(10)
        await adapter.close()
        await engine.close()


async def mention_answered(fake: FakeDiscord, text: str) -> tuple[int, int]:
    """Mention the bot with `text`; the ids of the message and of the bot's reply to it."""
    message, [reply] = await answer_to(fake, f"{MENTION} {text}", mentions=(BOT_ID,))
    return message, int(reply.response["id"])


async def test_discord_again_reaction_edits_the_latest_reply_and_replaces_the_exchange(
    discord, discord_bot, memory_url
):
    adapter, engine = await discord_bot(memory_url)
    conversation = f"discord:{CHANNEL_ID}"
    await mention_answered(discord, "hello")
    _, reply = await mention_answered(discord, "how are you?")
    first, old = await engine.history(conversation)
    assert discord.messages[reply]["content"] == "take 2: how are you?"
    created = len(discord.created())

    await discord.react(reply, AGAIN, user_id=OTHER_USER_ID)
    [edit] = await discord.wait_for(lambda: discord.edits(reply), what="the reply edited")
    assert edit.json["content"] == "sampled take 3: how are you?"
    assert edit.json["allowed_mentions"]["parse"] == []
    assert discord.messages[reply]["content"] == "sampled take 3: how are you?"
    assert len(discord.created()) == created  # edited in place: no new message
    new_first, new = await engine.history(conversation)
    assert new_first == first and (new.user, new.bot) == ("how are you?", " sampled take 3: how are you?")
    assert new.id != old.id

    # 👍 on the edited reply rates the new answer.
    await discord.react(reply, THUMBS_UP)
    [row] = await eventually(engine.store.list_feedback, what="the rating")
    assert (row.exchange, row.rating) == (ExchangeRef(conversation, new.id), "good")


async def test_discord_again_on_an_older_reply_says_it_redoes_only_the_latest(discord, discord_bot):
    adapter, engine = await discord_bot()
    _, older = await mention_answered(discord, "hello")
    await mention_answered(discord, "how are you?")
    before = await engine.history(f"discord:{CHANNEL_ID}")

    created = len(discord.created())
    await discord.react(older, AGAIN)
    await discord.wait_for(lambda: len(discord.created()) > created, what="the refusal")
    [refusal] = discord.created()[created:]
    assert refusal.json["content"] == "I can only redo my latest answer in this conversation."
    assert int(refusal.json["message_reference"]["message_id"]) == older
    assert discord.edits() == []
    assert await engine.history(f"discord:{CHANNEL_ID}") == before


async def test_discord_again_is_rate_limited_like_a_message(discord, discord_bot):
    adapter, engine = await discord_bot(rate_limit_burst=2, rate_limit_per_minute=1)
    _, reply = await mention_answered(discord, "hello")
    await discord.react(reply, AGAIN)
    await discord.wait_for(lambda: discord.edits(reply), what="the first redo")
    created = len(discord.created())
    await discord.react(reply, AGAIN)
    await discord.wait_for(lambda: len(discord.created()) > created, what="the rate limit notice")
    [notice] = discord.created()[created:]
    assert notice.json["content"].startswith("You're sending messages faster than I can answer.")
    assert len(discord.edits(reply)) == 1
    [kept] = await engine.history(f"discord:{CHANNEL_ID}")
    assert kept.bot == " sampled take 2: hello"


# -- Slack: the "Try again" button, the reply updated ------------------------------------------


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.close()


@pytest.fixture
async def slack_bot(slack, tiny_model, make_settings):
    """Start the Slack adapter (HTTP mode on a real aiohttp server, or Socket Mode) over a real
    engine, `Takes` and a memory store, against the fake."""
    cleanups = []

    async def start(memory: str = "memory://", *, socket_mode: bool = False, **overrides) -> SlackBot:
        tokens = {"slack_app_token": "xapp-test"} if socket_mode else {"slack_signing_secret": SECRET}
        settings = make_settings(slack_bot_token="xoxb-test", slack_api_url=slack.api_url, memory_url=memory,
                                 **tokens, **overrides)
        model = Takes(tiny_model)
        engine = ReplyEngine(model, open_store(memory, max_turns=5), settings)
        await engine.start()
        adapter = SlackAdapter(settings, engine)
        app = web.Application()
        adapter.mount(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await adapter.start()
        bot = SlackBot(adapter, engine, model, f"http://127.0.0.1:{port}/slack/events", aiohttp.ClientSession())
        cleanups.append((bot, runner))
        return bot

    yield start
    for bot, runner in cleanups:
        bot.adapter.stop_accepting()
        await bot.adapter.drain(10)
        await bot.adapter.close()
        await runner.cleanup()
        await bot.engine.close(timeout=10)
        await bot.session.close()


def shown(fake: FakeSlack, channel: str, ts: str) -> dict:
    """The bot's message at `ts` as Slack holds it now (edits included), as it comes in a payload."""
    message = next(m for m in fake.messages[channel] if m["ts"] == ts)
    return {key: value for key, value in message.items() if key != "metadata"}


def try_again(message: dict) -> dict:
    """The action a click on the "Try again" button of `message` sends (from its blocks)."""
    block = next(b for b in message["blocks"] if b["type"] == "actions")
    button = next(e for e in block["elements"] if e["action_id"] == AGAIN_ACTION)
    return {"type": "button", "action_id": button["action_id"], "block_id": block.get("block_id", "again"),
            "value": button["value"], "text": button["text"]}


async def slack_dm(fake: FakeSlack, bot: SlackBot, text: str) -> dict:
    """DM the bot over HTTP; its answer, as Slack holds it."""
    before = len(fake.posts)
    await bot.send(event_body(dm(text)))
    await wait_for(lambda: len(fake.posts) > before and not fake.thinking, what="the answer")
    return shown(fake, "D1", fake.posts[-1].response_ts)


async def test_slack_try_again_updates_the_latest_answer_and_replaces_the_exchange(slack, slack_bot, memory_url):
    bot = await slack_bot(memory_url)
    await slack_dm(slack, bot, "hello")
    answer = await slack_dm(slack, bot, "how are you?")
    first, old = await bot.engine.history("slack:T1:D1")
    assert answer["text"] == "take 2: how are you?"
    assert [b["type"] for b in answer["blocks"]] == ["section", "context_actions", "actions"]
    assert try_again(answer)["text"]["text"] == AGAIN_LABEL

    payload = block_actions(try_again(answer), user="U3", message=answer, channel="D1")
    assert await click(bot, payload) == 200
    [update] = await wait_for(lambda: slack.calls_to("chat.update"), what="the answer updated")
    assert (update.params["channel"], update.params["ts"]) == ("D1", answer["ts"])
    now = shown(slack, "D1", answer["ts"])
    assert now["text"] == "sampled take 3: how are you?" and "edited" in now
    assert now["blocks"][0]["text"]["text"] == "sampled take 3: how are you?"
    assert len(slack.posts) == 2  # updated in place: nothing new posted
    new_first, new = await bot.engine.history("slack:T1:D1")
    assert new_first == first and (new.user, new.bot) == ("how are you?", " sampled take 3: how are you?")
    assert new.id != old.id

    # The buttons now name the new answer: a rating is its rating.
    assert await click(bot, block_actions(clicked_on(now, "good"), message=now, channel="D1")) == 200
    [row] = await eventually(bot.engine.store.list_feedback, what="the rating")
    assert (row.exchange, row.rating) == (ExchangeRef("slack:T1:D1", new.id), "good")


async def test_slack_try_again_on_an_older_answer_tells_the_clicker_only(slack, slack_bot):
    bot = await slack_bot(socket_mode=True)
    older = await slack_dm_over_socket(slack, "hello")
    await slack_dm_over_socket(slack, "how are you?")
    before = await bot.engine.history("slack:T1:D1")

    envelope = await slack.send_interactive(block_actions(try_again(older), message=older, channel="D1"))
    await wait_for(lambda: slack.acked(envelope), what="the click's ack")
    [note] = await wait_for(lambda: slack.calls_to("chat.postEphemeral"), what="the note")
    assert (note.params["user"], note.params["channel"], note.params["thread_ts"]) == ("U2", "D1", older["thread_ts"])
    assert note.params["text"] == "I can only redo my latest answer in this conversation."
    assert slack.calls_to("chat.update") == []
    assert await bot.engine.history("slack:T1:D1") == before


async def slack_dm_over_socket(fake: FakeSlack, text: str) -> dict:
    before = len(fake.posts)
    envelope = await fake.send_envelope(event_body(dm(text)))
    await wait_for(lambda: fake.acked(envelope) and len(fake.posts) > before and not fake.thinking,
                   what="the answer")
    return shown(fake, "D1", fake.posts[-1].response_ts)


async def test_slack_try_again_is_rate_limited_like_a_message(slack, slack_bot):
    bot = await slack_bot(rate_limit_burst=2, rate_limit_per_minute=1)
    answer = await slack_dm(slack, bot, "hello")
    assert await click(bot, block_actions(try_again(answer), message=answer, channel="D1")) == 200
    await wait_for(lambda: slack.calls_to("chat.update"), what="the first redo")
    now = shown(slack, "D1", answer["ts"])
    assert await click(bot, block_actions(try_again(now), message=now, channel="D1")) == 200
    [note] = await wait_for(lambda: slack.calls_to("chat.postEphemeral"), what="the rate limit note")
    assert note.params["text"].startswith("You're sending messages faster than I can answer.")
    assert len(slack.calls_to("chat.update")) == 1
    [kept] = await bot.engine.history("slack:T1:D1")
    assert kept.bot == " sampled take 2: hello"


def clicked_on(message: dict, rating: str) -> dict:
    """The action a click on `message`'s feedback button for `rating` sends."""
    actions = next(b for b in message["blocks"] if b["type"] == "context_actions")
    buttons = actions["elements"][0]
    button = buttons["positive_button" if rating == "good" else "negative_button"]
    return {"type": "feedback_buttons", "action_id": buttons["action_id"], "block_id": actions.get("block_id", "b1"),
            "value": button["value"], "text": button["text"]}
