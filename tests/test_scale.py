"""Several `blender-chat run` replicas on one Redis, as real processes: a
conversation continues on the other replica, a Slack event delivered to both is
answered once, a Slack thread the bot answered on one replica is followed on
the other, concurrent messages of one conversation on both replicas never
interleave, a user's rate limit holds across replicas, and a replica started
without Redis, or losing it, keeps answering, stays ready, reports the outage
as degraded on /readyz and in metrics, and recovers."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp.test_utils import TestClient, TestServer
from bot_process import BotProcess, http, metric, port_env
from conftest import REPO, subprocess_env
from fake_slack import FakeSlack, event_body, mention, new_ts, signed_headers
from redis_servers import PrivateRedis, delete_prefix, redis_url, shared_prefix, unique_prefix  # noqa: F401 (fixtures)

from bot.config import ConfigError, Settings, load_settings
from bot.memory.redis import RedisStore
from bot.model import load_chat_model
from bot.startup import open_engine
from bot.text import neutralize_mentions
from bot.web import build_app

pytestmark = pytest.mark.timeout(300)

SECRET = "scale-signing-secret"
# Small enough that the rate-limit test trips it with four messages, refilled too
# slowly (one a minute) to matter during the tests; other tests use a user per message.
BURST = 3


def replica_env(model_dir: Path, memory_url: str, **extra: str) -> dict[str, str]:
    return {
        "BLENDERBOT_MODEL": str(model_dir),
        "BLENDERBOT_MAX_NEW_TOKENS": "8",
        "BLENDERBOT_NUM_BEAMS": "1",
        "MEMORY_URL": memory_url,
        # The tiny model says random things; the safety filter could deflect one, which is never stored.
        "SAFETY": "off",
        **port_env(),
        **extra,
    }


class SlackInThread:
    """The fake Slack Web API on its own event loop in a thread, so that the
    synchronous tests and both replicas can use it for the whole module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-slack", daemon=True)
        self.thread.start()
        self.fake: FakeSlack = asyncio.run_coroutine_threadsafe(FakeSlack().start(), self.loop).result(10)

    def posts_in(self, thread_ts: str) -> list[str]:
        calls = list(self.fake.calls)  # appended to by the other thread
        posts = [c for c in calls if c.method == "chat.postMessage"]
        return [c.params["text"] for c in posts if c.params.get("thread_ts") == thread_ts]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def slack():
    server = SlackInThread()
    yield server
    server.close()


@pytest.fixture(scope="module")
def replicas(blenderbot_dir, redis_url, shared_prefix, slack, tmp_path_factory):
    """Replicas A and B: `python -m bot run` on the shared Redis (this module's
    prefix), Slack in HTTP mode against one fake Slack, each on its own port."""
    tmp = tmp_path_factory.mktemp("replicas")
    env = replica_env(
        blenderbot_dir, f"{redis_url}?prefix={shared_prefix}", DATA_DIR=str(tmp),
        SLACK_BOT_TOKEN="xoxb-scale", SLACK_SIGNING_SECRET=SECRET, SLACK_API_URL=slack.fake.api_url,
        SLACK_THREAD_FOLLOWUPS="on", RATE_LIMIT_BURST=str(BURST), RATE_LIMIT_PER_MINUTE="1",
    )  # fmt: skip
    pair = [BotProcess(tmp / f"replica-{name}.log", **env) for name in "ab"]
    try:
        for replica in pair:
            replica.wait_ready()
        yield pair
        for replica in pair:  # a clean stop closes the shared Redis state too
            replica.signal(signal.SIGTERM)
            assert replica.wait(30) == 0, replica.log
            assert "Traceback" not in replica.log and "Unclosed" not in replica.log, replica.log
    finally:
        for replica in pair:
            replica.close()


def chat(replica: BotProcess, conversation: str, text: str, user: str | None = None) -> tuple[int, dict]:
    status, _, body = http("POST", replica.base + "/api/chat",
                           {"conversation": conversation, "text": text, "user": user or new_id()})  # fmt: skip
    return status, body


def history(replica: BotProcess, conversation: str) -> list[tuple[str, str]]:
    status, _, body = http("GET", f"{replica.base}/api/history?conversation={conversation}")
    assert status == 200, body
    return [(exchange["user"], exchange["bot"]) for exchange in body["exchanges"]]


def readyz(replica: BotProcess) -> tuple[int, dict]:
    status, _, body = http("GET", replica.base + "/readyz")
    return status, body


def eventually(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def new_id() -> str:
    return uuid.uuid4().hex[:12]


# -- two replicas on the shared Redis ---------------------------------------


def test_a_conversation_started_on_one_replica_continues_on_the_other(replicas) -> None:
    a, b = replicas
    conversation = new_id()
    replies = []
    for replica, text in ((a, "hello there, how are you?"), (b, "do you have any pets?"), (a, "i like pizza")):
        status, body = chat(replica, conversation, text)
        assert status == 200 and body["reply"].strip(), body
        replies.append((text, body["reply"]))
    # Either replica shows the whole conversation, each message with the reply its sender got.
    for replica in (a, b):
        stored = history(replica, conversation)
        assert [(user, neutralize_mentions(bot)) for user, bot in stored] == replies
    assert history(b, new_id()) == []


def test_the_same_slack_event_delivered_to_both_replicas_is_answered_once(replicas, slack) -> None:
    a, b = replicas
    event = mention("hello, what do you like to do for fun?")
    raw = json.dumps(event_body(event))

    def deliver(replica: BotProcess, body: str) -> int:
        status, _, _ = http("POST", replica.base + "/slack/events", raw=body.encode(),
                            headers=signed_headers(SECRET, body))  # fmt: skip
        return status

    # Both at once, as two Socket Mode connections or a retry through the load balancer would.
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(deliver, (a, b), (raw, raw))) == [200, 200]
    eventually(lambda: slack.posts_in(event["ts"]), "the answer")
    # Then a follow-up in the same thread on each replica: each is answered after
    # whatever that replica had taken of the doubled event.
    for replica in (a, b):
        follow_up = mention("and the weather?", user="U3", thread_ts=event["ts"])
        assert deliver(replica, json.dumps(event_body(follow_up))) == 200
    eventually(lambda: len(slack.posts_in(event["ts"])) >= 3, "the answers to the follow-ups")
    eventually(lambda: all(metric(r.base, "blenderchat_queue_depth") == 0 for r in replicas), "both replicas idle")
    time.sleep(0.5)  # a late second answer would be posted within this
    assert len(slack.posts_in(event["ts"])) == 3
    answered = sum(metric(r.base, "blenderchat_replies_total", platform="slack", outcome="ok") for r in replicas)
    assert answered == 3


def deliver(replica: BotProcess, event: dict) -> int:
    """A signed Slack event to one replica (as a load balancer in front of them would)."""
    raw = json.dumps(event_body(event))
    status, _, _ = http("POST", replica.base + "/slack/events", raw=raw.encode(), headers=signed_headers(SECRET, raw))
    return status


def test_a_slack_thread_answered_on_one_replica_is_followed_on_the_other(
    replicas, slack, redis_url, shared_prefix
) -> None:
    """Which threads the bot is in lives in the shared memory, not in one process."""
    a, b = replicas
    top = mention("let us talk in a thread", user="U" + new_id().upper())  # users of their own: rate limits
    assert deliver(a, top) == 200
    eventually(lambda: slack.posts_in(top["ts"]), "the answer in the thread")
    follow_ups = [
        {"type": "message", "channel_type": "channel", "user": "U" + new_id().upper(), "text": text,
         "ts": new_ts(), "channel": "C1", "thread_ts": top["ts"]}
        for text in ("and what about dogs?", "and cats?")
    ]  # fmt: skip
    for replica, event in zip((b, a), follow_ups):  # no mention: answered only as follow-ups
        assert deliver(replica, event) == 200
        count = len(slack.posts_in(top["ts"]))
        eventually(lambda count=count: len(slack.posts_in(top["ts"])) > count, "the follow-up's answer")
    never = {"type": "message", "channel_type": "channel", "user": "U2", "text": "not for the bot",
             "ts": new_ts(), "channel": "C1", "thread_ts": "1.000001"}  # fmt: skip
    assert deliver(b, never) == 200
    eventually(lambda: all(metric(r.base, "blenderchat_queue_depth") == 0 for r in replicas), "both replicas idle")
    time.sleep(0.5)  # a late answer would be posted within this
    assert len(slack.posts_in(top["ts"])) == 3 and slack.posts_in("1.000001") == []
    assert thread_history(redis_url, shared_prefix, top["ts"]) == [
        "let us talk in a thread", "and what about dogs?", "and cats?"
    ]


def thread_history(redis_url: str, prefix: str, thread_ts: str) -> list[str]:
    """The user messages stored for a Slack thread in the replicas' Redis memory."""

    async def read() -> list[str]:
        store = RedisStore(redis_url, max_turns=50, prefix=prefix)
        await store.open()
        try:
            return [exchange.user for exchange in await store.history(f"slack:T1:C1:{thread_ts}")]
        finally:
            await store.close()

    return asyncio.run(read())


async def test_concurrent_messages_of_one_conversation_on_both_replicas_never_interleave(
    replicas, redis_url, shared_prefix, blenderbot_dir
) -> None:
    a, b = replicas
    conversation = new_id()
    counter = itertools.count()
    sent: dict[int, list[str]] = {}  # chain -> its messages, in sending order
    replies: dict[str, str] = {}
    spans: list[tuple[str, float, float]] = []  # (replica, sent, answered)

    async def chain(session: aiohttp.ClientSession, number: int, replica: BotProcess) -> None:
        """Three messages one after the other (each after the previous answer) to one replica."""
        for _ in range(3):
            text = f"message {next(counter)} of chain {number}"
            sent.setdefault(number, []).append(text)
            started = time.monotonic()
            request = {"conversation": conversation, "text": text, "user": new_id()}
            async with session.post(replica.base + "/api/chat", json=request) as r:
                assert r.status == 200, await r.text()
                replies[text] = (await r.json())["reply"]
            spans.append((replica.base, started, time.monotonic()))

    # Four chains at once, alternately on A and B: each replica has two of them
    # waiting on the conversation, and the other replica competes for it too.
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(chain(session, n, (a, b)[n % 2]) for n in range(4)))
    pairs = itertools.combinations(spans, 2)
    overlapped = any(r1 != r2 and s1 < e2 and s2 < e1 for (r1, s1, e1), (r2, s2, e2) in pairs)
    assert overlapped, "the replicas never had the conversation at the same time: the test proved nothing"

    stored = history(b, conversation)
    assert sorted(user for user, _ in stored) == sorted(replies)  # every message stored once
    for user, bot in stored:
        assert replies[user] == neutralize_mentions(bot)
    order = [user for user, _ in stored]
    for messages in sent.values():  # each chain's messages in the order it sent them
        assert sorted(messages, key=order.index) == messages

    # No interleaving: each reply is what the model answers to exactly the exchanges stored before it.
    store = RedisStore(redis_url, max_turns=50, prefix=shared_prefix)
    await store.open()
    try:
        exchanges = await store.history(f"web:{conversation}")
    finally:
        await store.close()
    model = await asyncio.to_thread(load_chat_model, Settings(model=str(blenderbot_dir), max_new_tokens=8,
                                                              num_beams=1, threads=1))  # fmt: skip
    turns: list[str] = []
    for exchange in exchanges:
        [generated] = await asyncio.to_thread(model.generate, [[*turns, exchange.user]])
        assert generated.text == exchange.bot, f"{exchange.user!r} was answered without the exchange before it"
        turns += [exchange.user, exchange.bot]


def test_a_users_rate_limit_holds_across_replicas(replicas) -> None:
    a, b = replicas
    user = new_id()
    # Alternating: neither replica alone has seen more than BURST messages of this user.
    statuses = [chat(replica, new_id(), "hello there", user=user)[0] for replica in (a, b, a)]
    assert statuses == [200] * BURST
    status, body = chat(b, new_id(), "hello again", user=user)
    assert status == 429 and body["code"] == "rate_limited", body


def test_the_terminal_chat_continues_a_conversation_of_the_replicas(replicas, blenderbot_dir, redis_url, shared_prefix):
    a, b = replicas
    conversation = new_id()
    assert chat(a, conversation, "hello there")[0] == 200
    env = replica_env(blenderbot_dir, f"{redis_url}?prefix={shared_prefix}", LOG_LEVEL="WARNING")
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--conversation", f"web:{conversation}"],
        input="what do you like to do for fun?\n/quit\n", cwd=REPO, env=subprocess_env(**env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 earlier exchange remembered" in result.stdout and "you> hello there" in result.stdout
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr, result.stderr
    assert [user for user, _ in history(b, conversation)] == ["hello there", "what do you like to do for fun?"]


# -- one replica and a Redis that comes and goes ----------------------------


def test_a_replica_starts_without_redis_keeps_answering_through_an_outage_and_recovers(blenderbot_dir, tmp_path):
    server = PrivateRedis(tmp_path)  # its port chosen, not started yet
    bot = BotProcess(tmp_path / "bot.log", **replica_env(blenderbot_dir, server.url, DATA_DIR=str(tmp_path)))
    try:
        bot.wait_listening()

        def redis_reported() -> list[str] | None:
            status, body = readyz(bot)
            return body["degraded"] if status == 200 and body["degraded"] else None

        # Redis down at start-up: the process runs, stays ready (it answers), and says what it lacks.
        degraded = eventually(redis_reported, "/readyz to report Redis")
        assert all("redis" in reason.lower() for reason in degraded) and "model" not in str(degraded), degraded
        assert metric(bot.base, "blenderchat_dependency_up", dependency="memory") == 0
        status, body = chat(bot, "outage", "hello before redis")
        assert status == 200 and body["reply"].strip(), body

        server.start()
        eventually(lambda: readyz(bot)[1]["degraded"] == [], "/readyz to recover after Redis started")
        assert metric(bot.base, "blenderchat_dependency_up", dependency="memory") == 1
        assert chat(bot, "outage", "hello with redis")[0] == 200
        assert [user for user, _ in history(bot, "outage")] == ["hello with redis"]

        server.stop()  # Redis goes away mid-run
        degraded = eventually(redis_reported, "/readyz to report the outage")
        assert "redis" in str(degraded).lower() and readyz(bot)[0] == 200, degraded
        for text in ("are you there?", "still there?"):
            status, body = chat(bot, "outage", text)
            assert status == 200 and body["reply"].strip(), body
        assert metric(bot.base, "blenderchat_errors_total", kind="memory_write") >= 2

        server.start()  # same port, empty again (the test server keeps nothing)
        eventually(lambda: readyz(bot)[1]["degraded"] == [], "/readyz to recover after the restart")
        assert chat(bot, "outage", "back again")[0] == 200
        assert chat(bot, "outage", "and on")[0] == 200
        assert [user for user, _ in history(bot, "outage")] == ["back again", "and on"]

        bot.signal(signal.SIGTERM)
        assert bot.wait(30) == 0, bot.log
        assert "Traceback" not in bot.log and "hello before redis" not in bot.log
    finally:
        bot.close()
        server.stop()


# -- the wiring, in one process ----------------------------------------------


async def test_open_engine_shares_redis_and_readyz_names_a_separate_redis(make_settings, tmp_path) -> None:
    """REDIS_URL apart from a SQLite memory: the engine's locks and rate limits
    and /readyz use it; the memory store is not blamed for its outage, and the
    bot stays ready through it."""
    server = PrivateRedis(tmp_path)
    settings = make_settings(memory_url=f"sqlite:///{tmp_path / 'memory.db'}", redis_url=server.url,
                             rate_limit_burst=1, rate_limit_per_minute=1)  # fmt: skip
    engine, shared = await open_engine(settings)
    assert shared is not None and engine.limiter is shared.limiter
    async with engine:
        client = TestClient(TestServer(build_app(engine, settings, shared=shared), host="127.0.0.1", port=0))
        await client.start_server()
        try:
            response = await client.get("/readyz")
            degraded = (await response.json())["degraded"]
            assert response.status == 200 and len(degraded) == 1, degraded
            assert "Redis" in degraded[0] and "memory store" not in degraded[0], degraded
            server.start()
            response = await client.get("/readyz")
            assert response.status == 200 and (await response.json())["degraded"] == [], await response.text()
            for status in (200, 429):  # the bucket is in Redis now
                response = await client.post("/api/chat", json={"conversation": "c", "text": "hi", "user": "u"})
                assert response.status == status, await response.text()
            assert await server_keys(server.url, f"{shared.prefix}bucket:web:u")
        finally:
            await client.close()
            await shared.close()
            server.stop()


async def server_keys(url: str, pattern: str) -> list[bytes]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return await client.keys(pattern)
    finally:
        await client.aclose()


def test_a_redis_url_of_another_kind_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load_settings({"REDIS_URL": "http://cache:6379"}, dotenv=False)
    assert load_settings({"REDIS_URL": "rediss://cache:6380/1"}, dotenv=False).redis_url == "rediss://cache:6380/1"
