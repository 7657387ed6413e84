"""Issue 22's platform edges, through the real slack_bolt / discord.py clients against
the local fakes: a thread mention whose `message` twin comes first, a dropped connection
while posting (Discord, Slack), a Discord replay after Discord forgot the nonces, ratings
of a Discord reply identified by what it answers, and the users.info lookups one Slack
message may cost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from bot_process import sample
from fake_discord import BOT_ID, CHANNEL_ID, FakeDiscord
from fake_slack import event_body, mention, new_ts, wait_for
from platform_drivers import Scripted
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from test_slack import fake, sentinel, start_bot  # noqa: F401 (Slack's fixtures)

from adapters.discord import ASK_COMMAND, SEND_ATTEMPTS, DiscordAdapter
from adapters.slack import MAX_LOOKUPS
from bot.engine import ReplyEngine
from bot.errors import RateLimited
from bot.inbox import Inbox, open_inbox
from bot.inbox.sqlite import SQLiteInbox
from bot.memory import open_store
from bot.ratelimit import TokenBucketLimiter
from bot.shared import RedisRateLimiter, connect

DISCORD_MENTION = f"<@{BOT_ID}>"
LEASE = 1.0  # seconds: a message left to the inbox is answered again this soon


# -- Slack: a mention in a thread the bot has not answered (SLACK_THREAD_FOLLOWUPS=on) ---------------


@pytest.mark.parametrize("first", ["message", "app_mention"])
async def test_a_thread_mention_is_answered_whichever_of_its_two_events_comes_first(start_bot, fake, first, caplog):
    bot = await start_bot(slack_thread_followups=True)
    # A thread the bot was never in; Slack sends the mention as a `message` and as an `app_mention`.
    as_mention = mention("what do you think?", thread_ts="1700000000.000100")
    as_message = {**as_mention, "type": "message", "channel_type": "channel"}
    events = [as_message, as_mention] if first == "message" else [as_mention, as_message]
    with caplog.at_level(logging.DEBUG, logger="adapters.slack"):
        for event in events:
            assert (await bot.send(event_body(event)))[0] == 200
        await sentinel(bot, fake, already=1)
    in_thread = [p for p in fake.posts if p.params.get("thread_ts") == "1700000000.000100"]
    assert len(in_thread) == 1
    assert bot.model.inputs[0][-1] == "what do you think?"
    if first == "message":
        assert "left to its app_mention" in caplog.text  # what happened to the first one is logged


async def test_chatter_in_a_thread_the_bot_is_not_in_stays_unanswered_and_is_logged(start_bot, fake, caplog):
    bot = await start_bot(slack_thread_followups=True)
    chatter = {"type": "message", "channel_type": "channel", "user": "U2", "text": "lunch?", "ts": new_ts(),
               "channel": "C1", "thread_ts": "1700000000.000200"}
    with caplog.at_level(logging.DEBUG, logger="adapters.slack"):
        await bot.send(event_body(chatter))
        await sentinel(bot, fake, already=0)
    assert [p.params["channel"] for p in fake.posts] == ["DSENTINEL"]
    assert "not in that thread" in caplog.text


# -- Discord: the bot with a SQLite inbox that replays ---------------------------------------------


@dataclass
class DiscordBot:
    adapter: DiscordAdapter
    engine: ReplyEngine
    inbox: Inbox
    model: Scripted


@pytest.fixture
async def discord_fake() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def start_discord(
    discord_fake, tiny_model, make_settings, tmp_path
) -> AsyncIterator[Callable[..., Awaitable[DiscordBot]]]:
    """Start a Discord bot whose memory and inbox are one SQLite file (shared by every bot
    started here, as by a restarted process), the inbox replaying with a short lease."""
    running: list[DiscordBot] = []

    async def start(*, rewrite: Callable[[str, list[str], bool], str] | None = None, **overrides: Any) -> DiscordBot:
        settings = make_settings(
            discord_token=discord_fake.token, discord_api_url=discord_fake.api_url,
            discord_gateway_url=discord_fake.gateway_url, memory_url=f"sqlite:///{tmp_path / 'memory.db'}",
            inbox_lease=LEASE, **overrides,
        )  # fmt: skip
        model = Scripted(tiny_model, rewrite or answer_to_last)
        engine = ReplyEngine(model, open_store(settings.memory_url, max_turns=settings.memory_max_turns), settings)
        await engine.start()
        inbox = open_inbox(settings, engine.metrics)
        await inbox.open()
        adapter = DiscordAdapter(settings, engine, inbox=inbox)
        await adapter.start()
        inbox.start({"discord": adapter.replay})
        bot = DiscordBot(adapter, engine, inbox, model)
        running.append(bot)
        return bot

    yield start
    for bot in reversed(running):
        await stop_discord(bot, drain=10)


async def stop_discord(bot: DiscordBot, *, drain: float) -> None:
    """Stop a bot; with a short `drain`, as a process killed mid-answer: its claims are not
    renewed any more, and what it was still sending is cut off, neither finished."""
    await bot.inbox.close()
    bot.adapter.stop_accepting()
    await bot.adapter.drain(drain)
    await bot.adapter.close()
    await bot.engine.close(timeout=5)


def replies_to(fake: FakeDiscord, message_id: int) -> list[str]:
    """What the bot created in reply to `message_id` (Discord's own view: one per message)."""
    return [
        message["content"] for message in fake.messages.values()
        if int((message.get("message_reference") or {}).get("message_id", 0)) == message_id
    ]  # fmt: skip


def answer_to_last(text: str, turns: list[str], sample: bool) -> str:
    """A fixed answer per question: the tiny model's own text is random."""
    return f"An answer to: {turns[-1]}"


def long_answer(text: str, turns: list[str], sample: bool) -> str:
    """Three chunks on Discord (2,000 characters each at most), each sentence numbered."""
    return " ".join(f"Sentence number {n} of a long answer." for n in range(120))


async def test_a_connection_dropped_after_discord_created_a_chunk_sends_the_rest_once(discord_fake, start_discord):
    fake = discord_fake
    bot = await start_discord(rewrite=long_answer)
    fake.drop_connection("POST", f"/channels/{CHANNEL_ID}/messages", handled=True)
    message = await fake.send_message(f"{DISCORD_MENTION} tell me everything", mentions=(BOT_ID,))

    await fake.wait_for(lambda: len(fake.created(CHANNEL_ID)) >= 3, timeout=15, what="every chunk")
    await fake.wait_for(lambda: any(call.deduplicated for call in fake.calls), what="the resend")
    created = fake.created(CHANNEL_ID)
    assert len(created) == 3  # the first chunk once (Discord knew its nonce), then the other two
    assert [c.json["nonce"] for c in created] == sorted({c.json["nonce"] for c in created})
    assert " ".join(c.json["content"] for c in created).split() == long_answer("", [], False).split()
    assert len(replies_to(fake, message)) == 1
    # Finished (not replayed later): the done mark follows the last chunk's send.
    for _ in range(200):
        if await bot.inbox.store.depth() == 0:
            break
        await asyncio.sleep(0.05)
    assert await bot.inbox.store.depth() == 0


async def test_a_connection_that_keeps_dropping_leaves_the_answer_to_the_inbox(discord_fake, start_discord, caplog):
    fake = discord_fake
    bot = await start_discord()
    for _ in range(SEND_ATTEMPTS):  # every attempt of the first answer: Discord never gets it
        fake.drop_connection("POST", f"/channels/{CHANNEL_ID}/messages", handled=False)
    with caplog.at_level(logging.WARNING):
        message = await fake.send_message(f"{DISCORD_MENTION} hello there", mentions=(BOT_ID,))
        # Not lost: the inbox answers it once its claim lapses (a lease later), from the stored exchange.
        await fake.wait_for(lambda: replies_to(fake, message), timeout=20, what="the answer")
    await asyncio.sleep(LEASE * 2)  # a second replay would come within this
    assert len(replies_to(fake, message)) == 1
    assert len(await bot.engine.history(f"discord:{CHANNEL_ID}")) == 1  # generated and stored once
    assert len(bot.model.asked()) == 1
    assert await bot.inbox.store.depth() == 0
    assert "the inbox answers it again" in caplog.text and "A reply task failed" not in caplog.text


# -- Discord: a replay after Discord forgot the nonces -------------------------------------------------


@pytest.mark.parametrize("answer", ["short", "long"])
async def test_a_replay_after_discord_forgot_the_nonces_sends_only_what_the_channel_lacks(
    discord_fake, start_discord, answer
):
    """Discord honours `enforce_nonce` for "the past few minutes"; a message is replayed up to
    INBOX_MAX_AGE (10 minutes) after it came. The replay reads the channel instead."""
    fake = discord_fake
    rewrite = long_answer if answer == "long" else None
    first = await start_discord(rewrite=rewrite)
    # Discord creates the (first chunk of the) answer; the process dies before it hears so.
    fake.hold_response("POST", f"/channels/{CHANNEL_ID}/messages")
    message = await fake.send_message(f"{DISCORD_MENTION} tell me everything", mentions=(BOT_ID,))
    await fake.wait_for(lambda: fake.withheld, what="the answer created")
    await stop_discord(first, drain=0.1)
    fake.release_held()
    fake.nonce_window = 0  # the restart comes after the few minutes Discord remembers a nonce
    before = len(fake.calls)

    second = await start_discord(rewrite=rewrite)
    await fake.wait_for(lambda: len(fake.calls) > before + 3, what="the second process at work")
    await eventually_empty(second.inbox)  # the replay is done
    await asyncio.sleep(LEASE * 2)  # a second replay or a late post would come within this
    created = fake.created(CHANNEL_ID)
    assert len(replies_to(fake, message)) == 1
    expected = long_answer("", [], False) if answer == "long" else "An answer to: tell me everything"
    assert " ".join(c.json["content"] for c in created).split() == expected.split()  # each chunk once, in order
    assert len(second.model.asked()) == 0  # the stored answer, not a new one


async def test_a_replay_that_cannot_read_the_channel_sends_the_answer_with_a_warning(
    discord_fake, start_discord, caplog
):
    fake = discord_fake
    first = await start_discord()
    fake.hold_response("POST", f"/channels/{CHANNEL_ID}/messages")
    message = await fake.send_message(f"{DISCORD_MENTION} hello there", mentions=(BOT_ID,))
    await fake.wait_for(lambda: fake.withheld, what="the answer created")
    await stop_discord(first, drain=0.1)
    fake.release_held()
    fake.nonce_window = 0
    fake.forbid("GET", f"/channels/{CHANNEL_ID}/messages")  # no Read Message History

    with caplog.at_level(logging.WARNING, logger="adapters.discord"):
        second = await start_discord()
        await fake.wait_for(lambda: len(replies_to(fake, message)) == 2, what="the answer sent again")
        await eventually_empty(second.inbox)
    # The user has an answer (twice: the risk the warning names), and the operator a reason.
    assert "Could not read channel" in caplog.text and "Missing Access" in caplog.text


async def eventually_empty(inbox: Inbox, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await inbox.store.depth():
        assert asyncio.get_running_loop().time() < deadline, "the inbox never emptied"
        await asyncio.sleep(0.05)


# -- Discord: a 👍/👎 on a reply sent before a restart rates that reply's exchange -----------------------


THUMBS_DOWN = "\N{THUMBS DOWN SIGN}"


def same_answer(text: str, turns: list[str], sample: bool) -> str:
    """BlenderBot often repeats itself: every question gets the same answer."""
    return "I like pizza, do you?"


async def rated(bot: DiscordBot) -> list:
    deadline = asyncio.get_running_loop().time() + 20
    while not (rows := await bot.engine.store.list_feedback()):
        assert asyncio.get_running_loop().time() < deadline, "no rating stored"
        await asyncio.sleep(0.05)
    return rows


async def ask(fake: FakeDiscord, question: str, chunks: int = 1) -> list[int]:
    """Mention the bot with `question`; the ids of the `chunks` messages of its answer."""
    message = await fake.send_message(f"{DISCORD_MENTION} {question}", mentions=(BOT_ID,))

    def answer() -> list[int]:
        ids = sorted(fake.messages)
        first = next((i for i in ids if int((fake.messages[i].get("message_reference") or {}).get("message_id", 0))
                      == message), None)  # fmt: skip
        mine = [i for i in ids if first is not None and i >= first and fake.messages[i]["author"]["id"] == str(BOT_ID)]
        return mine if len(mine) >= chunks else []

    return await fake.wait_for(answer, what=f"the {chunks} messages of the answer")


@pytest.mark.parametrize("chunk", ["first", "later"])
async def test_a_rating_after_a_restart_lands_on_the_rated_reply_not_an_identical_newer_one(
    discord_fake, start_discord, chunk
):
    fake = discord_fake
    rewrite = same_answer if chunk == "first" else long_answer
    first = await start_discord(rewrite=rewrite)
    chunks = 1 if chunk == "first" else 3
    older = await ask(fake, "what do you like?", chunks)
    newer = await ask(fake, "and what else?", chunks)
    assert len(older) == len(newer) == chunks
    rated_exchange, newest = await first.engine.history(f"discord:{CHANNEL_ID}")
    assert rated_exchange.bot == newest.bot  # the same words twice
    await stop_discord(first, drain=10)

    restarted = await start_discord(rewrite=rewrite)  # knows no message ids: only Discord and the memory
    await fake.react(older[0 if chunk == "first" else 1], THUMBS_DOWN)
    [row] = await rated(restarted)
    assert row.exchange.id == rated_exchange.id and row.rating == "bad"


async def test_a_rating_of_an_ask_blenderbot_answer_after_a_restart_lands_on_that_answer(discord_fake, start_discord):
    fake = discord_fake
    first = await start_discord(rewrite=same_answer)
    await ask(fake, "what do you like?")
    question = await fake.send_message("what is the best cheese?")  # not to the bot: asked through the menu
    interaction = await fake.context_menu(ASK_COMMAND, question)
    calls = await fake.wait_for(lambda: (c := fake.interaction_calls(interaction)) and len(c) >= 2 and c,
                                what="the followup")  # fmt: skip
    await ask(fake, "and what else?")  # the same words again, newer
    _, asked, _ = await first.engine.history(f"discord:{CHANNEL_ID}")
    assert asked.user == "what is the best cheese?"
    await stop_discord(first, drain=10)

    restarted = await start_discord(rewrite=same_answer)
    await fake.react(int(calls[1].response["id"]), THUMBS_DOWN)
    [row] = await rated(restarted)
    assert row.exchange.id == asked.id


# -- Slack: what name lookups one message may cost ------------------------------------------------------


def mentions_of(count: int, first: int = 0) -> str:
    """`count` mentions of users Slack does not know, 12 characters each."""
    return " ".join(f"<@U{n:08d}>" for n in range(first, first + count))


def replies_metric(bot: Any, outcome: str) -> float:
    return sample(bot.engine.metrics.render().decode(), "blenderchat_replies_total", platform="slack", outcome=outcome)


async def test_a_message_of_400_mentions_costs_a_few_lookups(start_bot, fake):
    bot = await start_bot()
    for first in (0, 400, 800):  # 4,800 characters each, 400 different unknown users each
        await bot.send(event_body(mention(mentions_of(400, first))))
    await wait_for(lambda: replies_metric(bot, "too_long") == 3, what="three answers")
    assert len(fake.calls_to("users.info", ok_only=False)) <= 3 * MAX_LOOKUPS


async def test_an_unknown_user_is_remembered_as_unknown(start_bot, fake):
    bot = await start_bot()
    for answered in (1, 2, 3):  # one after the other: messages at once share a lookup anyway
        await bot.send(event_body(mention("say hi to <@UNOBODY> and <@U2>")))
        await wait_for(lambda: replies_metric(bot, "ok") == answered, what="the answer")
    looked_up = [call.params["user"] for call in fake.calls_to("users.info", ok_only=False)]
    assert looked_up.count("UNOBODY") == 1 and looked_up.count("U2") == 1
    assert bot.model.inputs[-1][-1] == "say hi to someone and Alice"


async def test_a_message_refused_anyway_costs_no_lookup(start_bot, fake):
    bot = await start_bot(rate_limit_per_minute=1, rate_limit_burst=1, max_input_chars=200)
    await bot.send(event_body(mention("say hi to <@U2>")))
    await wait_for(lambda: replies_metric(bot, "ok") == 1, what="the first answer")
    assert len(fake.calls_to("users.info", ok_only=False)) == 1
    # Over the rate limit now: three more messages, each with five users never seen.
    for first in (0, 5, 10):
        await bot.send(event_body(mention(f"and to {mentions_of(5, first)}")))
    await wait_for(lambda: replies_metric(bot, "rate_limited") == 3, what="three refusals")
    # Too long, whatever the names: another user, within the rate limit.
    await bot.send(event_body(mention(f"{'blah ' * 50} {mentions_of(5, 20)}", user="U3")))
    await wait_for(lambda: replies_metric(bot, "too_long") == 1, what="the refusal")
    assert len(fake.calls_to("users.info", ok_only=False)) == 1


@pytest.mark.parametrize("where", ["process", "redis"])
async def test_a_limiter_tells_whether_it_would_let_a_message_through_without_taking_a_token(where, redis_url):
    prefix = unique_prefix()
    client = connect(redis_url) if where == "redis" else None
    limiter = (
        RedisRateLimiter(client, burst=2, per_minute=1, prefix=prefix, blocked=frozenset({"UBAD"})) if client
        else TokenBucketLimiter(burst=2, per_minute=1, blocked=frozenset({"UBAD"}))
    )  # fmt: skip
    try:
        for _ in range(5):
            assert await limiter.admits("U1")  # asking takes nothing: the burst of two is still there
        await limiter.acquire("U1")
        assert await limiter.admits("U1")
        await limiter.acquire("U1")
        assert not await limiter.admits("U1") and await limiter.admits("U2")
        with pytest.raises(RateLimited):
            await limiter.acquire("U1")
        assert not await limiter.admits("UBAD")
    finally:
        if client is not None:
            await client.aclose()
            delete_prefix(redis_url, prefix)


# -- Slack: the same for a post Slack never got ----------------------------------------------------------


async def test_a_slack_answer_whose_posts_keep_failing_for_a_while_is_posted_once(start_bot, fake, tmp_path, caplog):
    bot = await start_bot(reply="Here is my answer.", inbox_lease=LEASE, inbox_store=SQLiteInbox(tmp_path / "inbox.db"))
    bot.adapter.inbox.start({"slack": bot.adapter.replay})
    try:
        # The first four tries of the post lose their connection (slack_sdk does not retry a post: ours do).
        fake.break_next("chat.postMessage", "disconnect", times=4)
        event = mention("hello there")
        with caplog.at_level(logging.WARNING):
            await bot.send(event_body(event))
            await wait_for(lambda: fake.posts, what="the answer, tried again in place")
            await wait_for(lambda: not fake.thinking, what="the thinking status cleared")
        await asyncio.sleep(LEASE * 2)  # a second replay would come within this
        assert [p.params["text"] for p in fake.posts] == ["Here is my answer."]
        assert fake.posts[0].params["thread_ts"] == event["ts"]
        assert len(bot.model.inputs) == 1  # the stored answer, not a second one
        assert "trying again" in caplog.text and "A reply task failed" not in caplog.text
    finally:
        await bot.adapter.inbox.close()
