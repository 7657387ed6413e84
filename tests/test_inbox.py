"""Every accepted message answered exactly once (bot/inbox): the claims and the
inbox on the real SQLite file and the real Redis, and `blender-chat run` killed
with SIGKILL while Discord and Slack messages are in flight, then started again
(or, on Redis, answered by the replica still running)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from bot_process import BotProcess, http, metric, port_env, sample
from fake_discord import BOT_ID, CHANNEL_ID, DM_CHANNEL_ID, OTHER_CHANNEL_ID, FakeDiscord
from fake_slack import BOT_USER_ID, TEAM_ID, FakeSlack, dm, event_body, mention, signed_headers, wait_for
from redis_servers import PrivateRedis, delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)

from bot.config import Settings
from bot.inbox import ACCEPTED, DONE, HELD, Claim, Entry, Inbox
from bot.inbox.redis import RedisInbox
from bot.inbox.sqlite import SQLiteInbox
from bot.memory import open_store
from bot.metrics import Metrics
from bot.startup import open_engine
from bot.web import build_app

MENTION = f"<@{BOT_ID}>"


@pytest.fixture(params=["sqlite", "redis"])
async def store(request, tmp_path, redis_url):
    if request.param == "sqlite":
        backend = SQLiteInbox(tmp_path / "memory.db")
    else:
        prefix = unique_prefix()
        backend = RedisInbox(redis_url, prefix=prefix)
        request.addfinalizer(lambda: delete_prefix(redis_url, prefix))
    await backend.open()
    yield backend
    await backend.close()


def entry(text: str = "hello", key: str | None = None) -> Entry:
    return Entry(key or f"test:{uuid.uuid4().hex}", "discord", "discord:1", "u1", text, {"channel": 1})


async def test_a_claim_is_held_then_lapses_then_is_done_for_good(store):
    first = entry()
    outcome, recorded = await store.accept(first, "process-a", 0.5)
    assert outcome == ACCEPTED and recorded.id
    assert (await store.accept(first, "process-b", 0.5))[0] == HELD  # a retry while A answers
    assert await store.orphans(0.5, 10) == []  # A is alive: nothing to replay
    await asyncio.sleep(0.7)  # A died: its lease lapses
    [orphan] = await store.orphans(0.5, 10)
    assert (orphan.key, orphan.text, orphan.route) == (first.key, "hello", {"channel": 1})
    assert await store.reclaim(orphan, "process-b", 0.5) == ACCEPTED
    await store.renew([orphan.key], "process-b", 5.0)  # B renews while it answers
    await asyncio.sleep(0.7)
    assert await store.reclaim(orphan, "process-c", 0.5) == HELD
    await store.finish(orphan, 60.0)
    assert await store.reclaim(orphan, "process-c", 0.5) == DONE
    assert (await store.accept(first, "process-c", 0.5))[0] == DONE  # Slack's retry 5 minutes later
    assert await store.depth() == 0


async def test_orphans_come_oldest_first(store):
    entries = [entry(f"message {n}") for n in range(5)]
    for each in entries:
        await store.accept(each, "dead-process", 0.2)
    await asyncio.sleep(0.4)
    assert [orphan.text for orphan in await store.orphans(0.2, 10)] == [f"message {n}" for n in range(5)]
    assert await store.depth() == 5


async def test_a_retry_after_the_lease_lapsed_is_answered_and_the_first_entry_is_not_replayed(store):
    settings = Settings(inbox_lease=0.3)
    dead, live = Inbox(store, settings), Inbox(store, settings)
    message = entry("hello")
    assert await dead.accept(message) is not None  # then its process is killed
    await asyncio.sleep(0.5)
    retry = await live.accept(message)  # Slack's retry reaches a live process after the lease
    assert retry is not None
    replayed: list[Claim] = []
    live._replayers = {"discord": replayed.append}
    assert await live.scan() == 0  # the dead process's entry is being answered, under the retry
    await live.finish(retry)
    await asyncio.sleep(0.5)
    assert await live.scan() == 0 and replayed == []  # answered: its first entry is dropped, not replayed
    assert await store.depth() == 0
    assert await live.accept(message) is None  # Slack's last retry


async def test_an_inbox_that_cannot_be_written_still_lets_messages_through_with_one_warning(caplog):
    # Redis is down (nothing listens on that port): the message is answered unrecorded.
    settings = Settings(inbox_lease=1.0)
    metrics = Metrics()
    inbox = Inbox(RedisInbox("redis://127.0.0.1:1/0", prefix=unique_prefix()), settings, metrics)
    await inbox.open()
    claims = [await inbox.accept(entry(f"message {n}")) for n in range(3)]
    assert all(claim is not None and not claim.recorded for claim in claims)
    for claim in claims:
        await inbox.finish(claim)
    warnings = [r for r in caplog.records if r.name == "bot.inbox" and r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "still answered" in warnings[0].getMessage()
    assert _sample(metrics, "blenderchat_errors_total", kind="inbox") >= 3
    await inbox.close()


async def test_readyz_names_an_inbox_that_cannot_be_written_until_it_works_again(make_settings, tmp_path):
    server = PrivateRedis(tmp_path)  # its port chosen, not started: Redis is down
    settings = make_settings()
    engine, _ = await open_engine(settings)
    inbox = Inbox(RedisInbox(server.url, prefix=unique_prefix()), settings, engine.metrics)
    await inbox.open()
    async with engine:
        client = TestClient(TestServer(build_app(engine, settings, inbox=inbox), host="127.0.0.1", port=0))
        await client.start_server()
        try:
            response = await client.post("/api/chat", json={"conversation": "c", "text": "hello", "user": "u"})
            assert response.status == 200 and (await response.json())["reply"].strip()  # answered, unrecorded
            response = await client.get("/readyz")
            body = await response.json()
            assert response.status == 200 and len(body["degraded"]) == 1, body  # ready: it answers
            assert "inbox cannot be written (redis" in body["degraded"][0], body
            assert str(server.port) not in body["degraded"][0]  # no addresses on an open endpoint
            server.start()
            response = await client.post("/api/chat", json={"conversation": "c", "text": "and now?", "user": "u"})
            assert response.status == 200
            response = await client.get("/readyz")
            assert (await response.json())["degraded"] == []
        finally:
            await client.close()
            await inbox.close()
            server.stop()


async def test_a_dead_processes_messages_are_replayed_once_in_arrival_order(tmp_path):
    settings = Settings(inbox_lease=0.3, inbox_max_age=600.0)
    dead = Inbox(SQLiteInbox(tmp_path / "memory.db"), settings)
    await dead.store.open()  # only its store: a process that died renews nothing
    for n in range(4):
        assert await dead.accept(entry(f"message {n}")) is not None  # then the process is killed
    old = Entry("test:old", "discord", "discord:1", "u1", "too old", arrived=time.time() - 3600)
    assert await dead.accept(old) is not None
    await asyncio.sleep(0.5)
    replayed: list[str] = []
    live = Inbox(SQLiteInbox(tmp_path / "memory.db"), settings)
    await live.open()
    live._replayers = {"discord": lambda claim: replayed.append(claim.entry.text)}
    assert await live.scan() == 4
    assert replayed == [f"message {n}" for n in range(4)]  # oldest first; the hour-old one dropped
    assert _sample(live.metrics, "blenderchat_inbox_expired_total", platform="discord") == 1
    assert await live.scan() == 0  # claimed now: not twice
    await asyncio.gather(dead.close(), live.close())


# -- `blender-chat run`, killed and started again -------------------------------------

SECRET = "inbox-signing-secret"
HELD_FOR_GOOD = 600.0  # a request held longer than any test: it never reaches the platform


@dataclass
class Bots:
    discord: FakeDiscord
    slack: FakeSlack
    start: Callable[..., Awaitable[BotProcess]]
    memory_url: str


@pytest.fixture
async def bots(tmp_path, blenderbot_dir):
    """The fake Discord and the fake Slack, and `start(name, discord=True, **env)`: a ready
    `blender-chat run` on Slack (HTTP mode) and, unless told not to, Discord, its memory and
    inbox in one SQLite file unless MEMORY_URL says otherwise; all are killed at the end."""
    discord = FakeDiscord()
    await discord.start()
    slack = await FakeSlack().start()
    processes: list[BotProcess] = []

    async def start(name: str, *, discord_too: bool = True, **extra: str) -> BotProcess:
        env = {
            "BLENDERBOT_MODEL": str(blenderbot_dir), "BLENDERBOT_MAX_NEW_TOKENS": "6", "BLENDERBOT_NUM_BEAMS": "1",
            "MEMORY_URL": bots.memory_url, "SAFETY": "off", "INBOX_LEASE": "2s",
            "SLACK_BOT_TOKEN": "xoxb-inbox", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": slack.api_url,
            **port_env(), **extra,
        }  # fmt: skip
        if discord_too:
            env |= {"DISCORD_TOKEN": discord.token, "DISCORD_API_URL": discord.api_url,
                    "DISCORD_GATEWAY_URL": discord.gateway_url}  # fmt: skip
        process = BotProcess(tmp_path / f"{name}.log", **env)
        processes.append(process)
        await asyncio.to_thread(process.wait_ready, 120)
        return process

    bots = Bots(discord, slack, start, f"sqlite:///{tmp_path}/memory.db")
    yield bots
    for process in processes:
        process.close()
    await slack.close()
    await discord.stop()


@pytest.fixture
def on_redis(bots, redis_url):
    """The bots' memory and inbox in Redis, on a key prefix of this test's own."""
    prefix = unique_prefix()
    bots.memory_url = f"{redis_url}?prefix={prefix}"
    yield bots
    delete_prefix(redis_url, prefix)


def _kill(process: BotProcess) -> None:
    process.signal(signal.SIGKILL)
    process.wait(30)


def _metric(process: BotProcess, name: str, **labels: str) -> float:
    return metric(process.base, name, **labels)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return sample(metrics.render().decode(), name, **labels)


async def _remembered(memory_url: str, conversation: str) -> list[str]:
    """What a conversation remembers the user saying, oldest first, read from the store itself."""
    store = open_store(memory_url, max_turns=100)
    await store.open()
    try:
        return [exchange.user for exchange in await store.history(conversation)]
    finally:
        await store.close()


async def _deliver(process: BotProcess, body: dict[str, Any], *, retry: int = 0) -> int:
    """A signed Slack event to one process, as Slack sends it (a retry says so in its headers)."""
    raw = json.dumps(body)
    headers = signed_headers(SECRET, raw)
    if retry:
        headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
    status, _, _ = await asyncio.to_thread(
        http, "POST", process.base + "/slack/events", raw=raw.encode(), headers=headers
    )
    return status


def _discord_answers(fake: FakeDiscord) -> list[dict]:
    """The bot's messages that exist on Discord (a request still held on its way is none)."""
    return [message for message in fake.messages.values() if int(message["author"]["id"]) == BOT_ID]


def _discord_replies_to(fake: FakeDiscord, message_id: int) -> list[dict]:
    return [
        message for message in _discord_answers(fake)
        if int((message.get("message_reference") or {}).get("message_id", 0)) == message_id
    ]  # fmt: skip


def _slack_answers(slack: FakeSlack) -> list[dict]:
    """The bot's messages that exist on Slack, in every channel."""
    return [message for messages in slack.messages.values() for message in messages if message["user"] == BOT_USER_ID]


def _slack_replies_to(slack: FakeSlack, channel: str, ts: str) -> list[dict]:
    """The bot's messages answering the user's message `ts`: each carries the id of what it answers."""
    answers = Entry(f"slack:{TEAM_ID}:{channel}:{ts}", "slack", "", "", "").exchange_id
    return [
        message for message in slack.messages.get(channel, [])
        if message["user"] == BOT_USER_ID and _marker(message) == answers
    ]  # fmt: skip


def _marker(message: dict) -> str | None:
    """The id of the message a bot's message answers (its message metadata)."""
    return ((message.get("metadata") or {}).get("event_payload") or {}).get("answers")


@dataclass
class Conversation:
    """One conversation the test talks in: a Discord channel, or a Slack thread or DM."""

    platform: str
    channel: Any  # a Discord channel id, or a Slack channel
    said: list[str] = field(default_factory=list)  # what the user said, in order
    sent: list[Any] = field(default_factory=list)  # the messages: Discord ids, Slack ts

    @property
    def name(self) -> str:
        if self.platform == "discord":
            return f"discord:{self.channel}"
        if self.channel.startswith("D"):
            return f"slack:{TEAM_ID}:{self.channel}"
        return f"slack:{TEAM_ID}:{self.channel}:{self.sent[0]}"

    async def say(self, bots: Bots, process: BotProcess, text: str) -> None:
        if self.platform == "discord":
            in_dm = self.channel == DM_CHANNEL_ID
            content, mentions = (text, ()) if in_dm else (f"{MENTION} {text}", (BOT_ID,))
            self.sent.append(await bots.discord.send_message(content, channel_id=self.channel, mentions=mentions))
        else:
            if self.channel.startswith("D"):
                event = dm(text, channel=self.channel)
            else:
                event = mention(text, channel=self.channel, thread_ts=self.sent[0] if self.sent else None)
            bots.slack.add_message(self.channel, event["ts"], event["text"], event["user"], event.get("thread_ts"))
            assert await _deliver(process, event_body(event)) == 200  # acked: claimed and recorded
            self.sent.append(event["ts"])
        self.said.append(text)

    def replies(self, bots: Bots, message: Any) -> list[dict]:
        if self.platform == "discord":
            return _discord_replies_to(bots.discord, message)
        return _slack_replies_to(bots.slack, self.channel, message)


def _conversations(discord: tuple[int, ...], slack: tuple[str, ...]) -> list[Conversation]:
    return [Conversation("discord", channel) for channel in discord] + [Conversation("slack", c) for c in slack]


async def _send_in_flight(bots: Bots, process: BotProcess, conversations: list[Conversation], count: int = 20) -> None:
    """`count` messages round the conversations; each conversation's first answer is held by the
    platform on its way (so the rest of it waits behind it): everything is in flight."""
    for conversation in conversations:
        if conversation.platform == "discord":
            bots.discord.delay("POST", f"/channels/{conversation.channel}/messages", HELD_FOR_GOOD)
        else:
            bots.slack.delay("chat.postMessage", HELD_FOR_GOOD)  # the first answers of the Slack ones
    for n in range(count):
        await conversations[n % len(conversations)].say(bots, process, f"message {n}")
    on_discord = sum(1 for c in conversations if c.platform == "discord")
    on_slack = len(conversations) - on_discord
    await wait_for(lambda: (bots.discord.held, bots.slack.held) == (on_discord, on_slack), timeout=60,
                   what="an answer held in each conversation")  # fmt: skip

    def typing() -> int:  # a Discord message shows typing once it is recorded and in line
        return sum(1 for call in bots.discord.calls if call.path.endswith("/typing"))

    # (Slack's ack came after each message was recorded.)
    on_discord_messages = sum(len(c.sent) for c in conversations if c.platform == "discord")
    await wait_for(lambda: typing() >= on_discord_messages, timeout=60, what="every Discord message taken in")
    assert _discord_answers(bots.discord) == [] and _slack_answers(bots.slack) == []  # nothing delivered yet


async def _assert_each_answered_once(bots: Bots, conversations: list[Conversation]) -> None:
    total = sum(len(c.sent) for c in conversations)
    await wait_for(lambda: len(_discord_answers(bots.discord)) + len(_slack_answers(bots.slack)) >= total,
                   timeout=120, what=f"{total} answers")  # fmt: skip
    await asyncio.sleep(3)  # more scans, to be sure nothing is answered twice
    for conversation in conversations:
        assert [len(conversation.replies(bots, message)) for message in conversation.sent] == [1] * len(
            conversation.sent
        ), conversation.name
        # Each conversation remembers what was said in the order it was said, once.
        assert await _remembered(bots.memory_url, conversation.name) == conversation.said
    assert len(_discord_answers(bots.discord)) + len(_slack_answers(bots.slack)) == total  # duplicates: 0
    await wait_for(lambda: not bots.slack.thinking, timeout=10,
                   what=f"no hourglass or status left up: {bots.slack.reactions} {bots.slack.statuses}")  # fmt: skip


@pytest.mark.timeout(300)
async def test_killed_with_20_messages_in_flight_every_one_is_answered_once_after_the_restart(bots):
    # Three Discord conversations (two channels and a DM), two Slack ones (a thread and a DM).
    conversations = _conversations((CHANNEL_ID, OTHER_CHANNEL_ID, DM_CHANNEL_ID), ("C1", "D1"))
    first = await bots.start("first")
    await _send_in_flight(bots, first, conversations)
    _kill(first)

    second = await bots.start("second")
    await _assert_each_answered_once(bots, conversations)
    assert _metric(second, "blenderchat_inbox_replayed_total", platform="discord") == 12
    assert _metric(second, "blenderchat_inbox_replayed_total", platform="slack") == 8
    assert _metric(second, "blenderchat_inbox_depth") == 0
    assert "Answering 20 messages left unanswered by a stopped process" in second.log


@pytest.mark.timeout(300)
async def test_two_replicas_on_redis_one_killed_the_other_answers_its_messages(on_redis):
    bots = on_redis
    conversations = _conversations((), ("C1", "C2", "D1"))  # two threads and a DM
    a = await bots.start("a", discord_too=False)
    b = await bots.start("b", discord_too=False)
    await _send_in_flight(bots, a, conversations)  # the load balancer sent them all to a
    _kill(a)

    await _assert_each_answered_once(bots, conversations)
    assert _metric(b, "blenderchat_inbox_replayed_total", platform="slack") == 20
    assert _metric(b, "blenderchat_inbox_depth") == 0


@pytest.mark.timeout(300)
async def test_a_slack_event_whose_replica_was_killed_is_answered_once_by_the_other(on_redis):
    bots = on_redis
    slack = bots.slack
    a = await bots.start("a", discord_too=False)
    b = await bots.start("b", discord_too=False)
    slack.delay("chat.postMessage", HELD_FOR_GOOD)  # a's answer is on its way when a is killed
    event = mention("hello there, what do you like?")
    slack.add_message("C1", event["ts"], event["text"], event["user"])
    body = event_body(event)
    assert await _deliver(a, body) == 200
    await wait_for(lambda: slack.held == 1, timeout=60, what="a answering")

    # Slack's first retry reaches b while a's lease is live: not answered twice.
    assert await _deliver(b, body, retry=1) == 200
    await wait_for(lambda: _metric(b, "blenderchat_inbox_duplicates_prevented_total", platform="slack") == 1,
                   timeout=30, what="the retry dropped")  # fmt: skip
    _kill(a)
    await asyncio.sleep(3)  # a's lease (2 s) lapses
    # The next retry, to b: b answers it, or has answered it already from a's inbox entry.
    assert await _deliver(b, body, retry=2) == 200
    await wait_for(lambda: _slack_replies_to(slack, "C1", event["ts"]), timeout=60, what="the answer")
    await asyncio.sleep(3)  # more scans and a late second answer would be posted within this
    posts = [call for call in slack.posts if call.params.get("thread_ts") == event["ts"]]
    assert len(posts) == 1 and len(_slack_replies_to(slack, "C1", event["ts"])) == 1
    assert await _remembered(bots.memory_url, f"slack:{TEAM_ID}:C1:{event['ts']}") == [
        "hello there, what do you like?"
    ]
    assert _metric(b, "blenderchat_inbox_depth") == 0
    await wait_for(lambda: not slack.thinking, what="no hourglass left up")


@pytest.mark.timeout(300)
async def test_a_discord_answer_posted_just_before_the_kill_is_not_posted_again(bots):
    fake = bots.discord
    first = await bots.start("first")
    # Discord creates the answer, and the process dies before it hears so (before the inbox ack).
    fake.hold_response("POST", f"/channels/{CHANNEL_ID}/messages")
    message = await fake.send_message(f"{MENTION} hello there", mentions=(BOT_ID,))
    await fake.wait_for(lambda: fake.withheld, timeout=60, what="the answer created")
    _kill(first)
    fake.release_held()

    second = await bots.start("second")
    await wait_for(lambda: _metric(second, "blenderchat_inbox_replayed_total", platform="discord") == 1,
                   timeout=60, what="the replay")  # fmt: skip
    # The replay reads the channel after the message, finds the answer there and sends nothing again.
    await wait_for(lambda: _metric(second, "blenderchat_inbox_duplicates_prevented_total", platform="discord") == 1,
                   timeout=30, what="the answer found")  # fmt: skip
    assert len(_discord_replies_to(fake, message)) == 1  # one answer, not two
    assert await _remembered(bots.memory_url, f"discord:{CHANNEL_ID}") == ["hello there"]  # remembered once


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["thread", "dm"])
async def test_a_slack_answer_posted_just_before_the_kill_is_not_posted_again(bots, where):
    slack = bots.slack
    first = await bots.start("first", discord_too=False)
    # Slack stores the answer, and the process dies before it hears so (before the inbox ack).
    slack.hold_response("chat.postMessage")
    conversation = Conversation("slack", "C1" if where == "thread" else "D1")
    await conversation.say(bots, first, "hello there")
    await wait_for(lambda: slack.withheld, timeout=60, what="the answer stored")
    _kill(first)
    slack.release_held()

    second = await bots.start("second", discord_too=False)
    await wait_for(lambda: _metric(second, "blenderchat_inbox_duplicates_prevented_total", platform="slack") == 1,
                   timeout=60, what="the replay finding the answer out")  # fmt: skip
    await asyncio.sleep(1)  # a second post would be on its way within this
    assert _metric(second, "blenderchat_inbox_replayed_total", platform="slack") == 1
    assert len(slack.posts) == 1  # the one made before the kill
    assert len(conversation.replies(bots, conversation.sent[0])) == 1
    assert await _remembered(bots.memory_url, conversation.name) == ["hello there"]
    assert "parts of an answer in" in second.log


@pytest.mark.timeout(300)
async def test_messages_older_than_inbox_max_age_are_not_answered_after_a_restart(bots):
    conversations = _conversations((CHANNEL_ID, OTHER_CHANNEL_ID, DM_CHANNEL_ID), ("C1", "D1"))
    first = await bots.start("first")
    await _send_in_flight(bots, first, conversations)
    _kill(first)
    await asyncio.sleep(3)

    second = await bots.start("second", INBOX_MAX_AGE="2s")
    await wait_for(lambda: _metric(second, "blenderchat_inbox_expired_total", platform="slack") == 8,
                   timeout=60, what="the old messages dropped")  # fmt: skip
    assert _metric(second, "blenderchat_inbox_expired_total", platform="discord") == 12
    await asyncio.sleep(1)
    assert _discord_answers(bots.discord) == [] and _slack_answers(bots.slack) == []
    assert "Dropped 20 unanswered messages older than INBOX_MAX_AGE=2s (discord 12, slack 8)" in second.log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["thread", "dm"])
async def test_a_slack_answer_that_cannot_be_posted_for_a_while_is_posted_once_and_in_order(bots, where):
    # The network to Slack drops for a while just as the first answer goes out: every try of the
    # post in that time fails. The answer is not lost, nor posted twice, and the second message's
    # answer waits behind it.
    slack = bots.slack
    process = await bots.start("only", discord_too=False)
    slack.break_next("chat.postMessage", "disconnect", times=6)
    conversation = Conversation("slack", "C1" if where == "thread" else "D1")
    await conversation.say(bots, process, "hello there")
    await conversation.say(bots, process, "and what about you?")
    await wait_for(lambda: all(conversation.replies(bots, ts) for ts in conversation.sent), timeout=90,
                   what="both answers, once the network is back")  # fmt: skip
    await asyncio.sleep(3)  # a second post (a replay) would come within this
    assert [len(conversation.replies(bots, ts)) for ts in conversation.sent] == [1, 1]
    first, second = (conversation.replies(bots, ts)[0]["ts"] for ts in conversation.sent)
    assert _ts(first) < _ts(second)  # in the order they were asked
    assert await _remembered(bots.memory_url, conversation.name) == ["hello there", "and what about you?"]
    assert _metric(process, "blenderchat_inbox_depth") == 0
    assert "Could not post a reply in" in process.log


def _ts(ts: str) -> tuple[int, int]:
    seconds, _, fraction = ts.partition(".")
    return int(seconds), int(fraction)
