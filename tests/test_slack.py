"""The Slack adapter, driven through the real slack_bolt / slack_sdk against a
local fake of Slack (tests/fake_slack.py), answering with the tiny BlenderBot."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import subprocess_env
from fake_slack import (
    BOT_ID,
    BOT_USER_ID,
    FakeSlack,
    dm,
    event_body,
    mention,
    new_ts,
    signed_headers,
    wait_for,
)
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from tcp_proxy import TcpProxy

from adapters.dedupe import DedupeStore, InProcessDedupe
from adapters.slack import FILE_ONLY, RESET_DONE, SlackAdapter, SlackStartError
from adapters.slack_surface import PROGRESS_REACTION, STATUS
from bot.engine import ReplyEngine
from bot.inbox import Inbox, InboxStore
from bot.inbox.redis import RedisInbox
from bot.memory import open_store
from bot.memory.inprocess import InProcessStore
from bot.shared import connect
from bot.web import build_app

SECRET = "test-signing-secret"


class ModelSpy:
    """The real tiny model, recording what it was asked; optionally slow, or with
    a scripted answer (the tiny model's own text is random junk)."""

    def __init__(self, model: Any, *, delay: float = 0.0, reply: str | None = None, echo: bool = False) -> None:
        self.model, self.delay, self.reply, self.echo = model, delay, reply, echo
        self.inputs: list[list[str]] = []
        self.personas: list[tuple[str, ...]] = []  # each conversation's persona, as `inputs`

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Any]:
        self.inputs += [list(turns) for turns in conversations]
        self.personas += [tuple(persona) for persona in personas or [()] * len(conversations)]
        if self.delay:
            time.sleep(self.delay)
        results = self.model.generate(conversations, sample=sample, personas=personas)
        if self.reply is not None:
            results = [replace(result, text=self.reply) for result in results]
        if self.echo:  # to tell answers apart
            results = [replace(result, text="re: " + turns[-1]) for result, turns in zip(results, conversations)]
        return results

    def check_persona(self, persona: Sequence[str]) -> None:
        self.model.check_persona(persona)


@dataclass
class Bot:
    adapter: SlackAdapter
    engine: ReplyEngine
    model: ModelSpy
    url: str  # the events endpoint (HTTP mode)
    session: aiohttp.ClientSession

    async def send(self, body: dict[str, Any] | str, *, headers: dict[str, str] | None = None,
                   retry: int | None = None) -> tuple[int, str]:
        raw = body if isinstance(body, str) else json.dumps(body)
        headers = signed_headers(SECRET, raw) if headers is None else headers
        if retry is not None:
            headers = {**headers, "X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        async with self.session.post(self.url, data=raw, headers=headers) as response:
            return response.status, await response.text()


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.close()


@pytest.fixture
async def start_bot(fake, tiny_model, make_settings):
    """Start an adapter (HTTP mode mounted on a real aiohttp server, or Socket Mode) over a real engine."""
    cleanups = []

    async def start(*, socket_mode: bool = False, delay: float = 0.0, reply: str | None = None, echo: bool = False,
                    dedupe: DedupeStore | None = None, inbox_store: InboxStore | None = None, **overrides) -> Bot:
        tokens = {"slack_app_token": "xapp-test"} if socket_mode else {"slack_signing_secret": SECRET}
        settings = make_settings(slack_bot_token="xoxb-test", slack_api_url=fake.api_url, **tokens, **overrides)
        model = ModelSpy(tiny_model, delay=delay, reply=reply, echo=echo)
        engine = ReplyEngine(model, open_store(settings.memory_url, max_turns=settings.memory_max_turns), settings)
        await engine.start()
        inbox = Inbox(inbox_store, settings, engine.metrics) if inbox_store else None
        if inbox is not None:
            await inbox.open()
        adapter = SlackAdapter(settings, engine, dedupe=dedupe, inbox=inbox)
        app = web.Application()
        adapter.mount(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        await adapter.start()
        bot = Bot(adapter, engine, model, f"http://127.0.0.1:{port}/slack/events", aiohttp.ClientSession())
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


def without_user(event: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in event.items() if key not in ("user", "text")}


async def answered(fake: FakeSlack, count: int = 1) -> list:
    """Wait until `count` replies were posted and every sign of thinking (status, hourglass) is gone."""
    await wait_for(lambda: len(fake.posts) >= count, what=f"{count} chat.postMessage")
    await wait_for(lambda: not fake.thinking, what="the thinking status or hourglass cleared")
    return fake.posts


async def sentinel(bot: Bot, fake: FakeSlack, already: int) -> None:
    """Send one ordinary DM and wait for its answer: events sent before it have been handled by then."""
    status, _ = await bot.send(event_body(dm("sentinel", channel="DSENTINEL")))
    assert status == 200
    await wait_for(lambda: any(p.params["channel"] == "DSENTINEL" for p in fake.posts), what="the sentinel answer")
    await answered(fake, already + 1)


# -- HTTP mode --------------------------------------------------------------


async def test_http_acks_at_once_while_the_model_is_slow_then_answers_in_the_thread(start_bot, fake):
    bot = await start_bot(delay=4.0)
    event = mention("what's your favourite book?")
    started = time.monotonic()
    status, _ = await bot.send(event_body(event))
    assert status == 200
    assert time.monotonic() - started < 3.0  # Slack's deadline; the model alone takes 4 s
    [post] = await answered(fake)
    assert post.params["channel"] == "C1"
    assert post.params["thread_ts"] == event["ts"]
    assert post.params["text"].strip()
    assert post.token == "xoxb-test"


async def test_http_progress_reaction_is_added_to_a_channel_message_answered_in_the_channel(start_bot, fake):
    # No thread to show Slack's status in: the hourglass (adapters/slack_surface.py; tests/test_slack_surface.py).
    bot = await start_bot(slack_reply_in_thread=False)
    event = mention("hello")
    await bot.send(event_body(event))
    await answered(fake)
    [added], [removed] = fake.calls_to("reactions.add"), fake.calls_to("reactions.remove")
    for call in (added, removed):
        assert (call.params["channel"], call.params["timestamp"], call.params["name"]) == (
            "C1", event["ts"], PROGRESS_REACTION)
    assert fake.calls.index(added) < fake.calls.index(fake.posts[0]) < fake.calls.index(removed)
    assert fake.status_calls() == []  # never both


async def test_http_retried_event_is_answered_once(start_bot, fake):
    bot = await start_bot(delay=0.5)
    body = event_body(mention("are you there?"))
    assert (await bot.send(body))[0] == 200
    assert (await bot.send(body, retry=1))[0] == 200
    await answered(fake)
    assert (await bot.send(body, retry=2))[0] == 200
    await sentinel(bot, fake, already=1)
    assert len([p for p in fake.posts if p.params["channel"] == "C1"]) == 1
    assert len(bot.model.inputs) == 2  # the mention and the sentinel


async def test_http_mention_also_delivered_as_message_is_answered_once(start_bot, fake):
    bot = await start_bot(slack_thread_followups=True)
    event = mention("hi there", channel="D7")
    await bot.send(event_body(event))
    await bot.send(event_body({**event, "type": "message", "channel_type": "im"}))
    await sentinel(bot, fake, already=1)
    assert len([p for p in fake.posts if p.params["channel"] == "D7"]) == 1


@pytest.mark.parametrize("case", ["bad", "missing", "stale", "other-secret", "non-numeric"])
async def test_http_unsigned_requests_are_refused_and_never_reach_the_model(start_bot, fake, case):
    bot = await start_bot()
    raw = json.dumps(event_body(mention("let me in")))
    headers = {
        "bad": {**signed_headers(SECRET, raw), "X-Slack-Signature": "v0=" + "0" * 64},
        "missing": {"Content-Type": "application/json"},
        "stale": signed_headers(SECRET, raw, timestamp=str(int(time.time()) - 600)),
        "other-secret": signed_headers("not-the-secret", raw),
        "non-numeric": {**signed_headers(SECRET, raw), "X-Slack-Request-Timestamp": "soon"},
    }[case]
    status, _ = await bot.send(raw, headers=headers)
    assert status == 401
    await sentinel(bot, fake, already=0)
    assert len(fake.posts) == 1 and len(bot.model.inputs) == 1  # only the sentinel


async def test_http_url_verification_echoes_the_challenge(start_bot, fake):
    bot = await start_bot()
    status, text = await bot.send({"token": "unused", "challenge": "c-12345", "type": "url_verification"})
    assert status == 200
    assert "c-12345" in text


async def test_http_bots_edits_deletions_and_own_messages_are_ignored(start_bot, fake):
    bot = await start_bot()
    ignored = [
        dm("from another bot", bot_id="B9"),
        # As Slack's samples have them: a bot's post, an edit and a deletion carry no top-level `user`.
        {**without_user(dm("bot message")), "subtype": "bot_message", "bot_id": "B9", "text": "bot message"},
        {**without_user(dm("")), "subtype": "message_changed", "hidden": True,
         "message": {"type": "message", "text": "edited", "user": "U2", "ts": new_ts()}},
        {**without_user(dm("")), "subtype": "message_deleted", "hidden": True, "deleted_ts": new_ts()},
        {**dm("joined"), "subtype": "channel_join"},
        dm("my own words", user=BOT_USER_ID, bot_id=BOT_ID),
        {"type": "message", "channel_type": "channel", "user": "U2", "text": "chatter", "ts": new_ts(),
         "channel": "C1"},  # a channel message that is no follow-up
    ]
    for event in ignored:
        assert (await bot.send(event_body(event)))[0] == 200
    await sentinel(bot, fake, already=0)
    assert len(fake.posts) == 1 and len(bot.model.inputs) == 1


async def test_http_broadcasts_and_mentions_never_reach_the_model_or_the_reply_live(start_bot, fake):
    bot = await start_bot(reply=" <!channel> hi <@U3> & <!here> <http://x.y|click> @everyone")
    text = "hey <!channel> <!here> <!everyone> <!subteam^S1|@devs> ask <@U2> and <@U3|bob>, 1 &lt; 2"
    await bot.send(event_body(mention(text)))
    [post] = await answered(fake)
    seen = bot.model.inputs[0][-1]
    assert "<" not in seen.replace("1 < 2", "") and ">" not in seen
    assert "Alice" in seen and "Bob" in seen and BOT_USER_ID not in seen and "1 < 2" in seen
    sent = post.params["text"]
    assert "<" not in sent and ">" not in sent
    # The engine defuses mention tokens (`<!channel>` -> `@\u200bchannel`); the adapter escapes what is left.
    assert "@\u200bchannel" in sent and "@\u200bU3" in sent and "&amp;" in sent and "&lt;http://x.y|click&gt;" in sent
    for broadcast in ("@channel", "@here", "@everyone"):
        assert broadcast not in sent


async def test_http_user_names_are_looked_up_once(start_bot, fake):
    bot = await start_bot()
    for _ in range(3):
        await bot.send(event_body(mention("say hi to <@U2>")))
    await answered(fake, 3)
    assert all(turns[-1] == "say hi to Alice" for turns in bot.model.inputs)
    assert len(fake.calls_to("users.info")) == 1


async def test_http_thread_replies_and_memory_per_thread(start_bot, fake):
    bot = await start_bot()
    top = mention("first question")
    await bot.send(event_body(top))
    await answered(fake, 1)
    await bot.send(event_body(mention("second question", thread_ts=top["ts"])))
    await answered(fake, 2)
    await bot.send(event_body(mention("elsewhere")))
    posts = await answered(fake, 3)
    assert [p.params["thread_ts"] for p in posts[:2]] == [top["ts"], top["ts"]]
    assert posts[2].params["thread_ts"] != top["ts"]
    history = await bot.engine.history(f"slack:T1:C1:{top['ts']}")
    assert [exchange.user for exchange in history] == ["first question", "second question"]
    assert bot.model.inputs[1][0] == "first question"  # the second turn saw the first


async def test_http_channel_mode_replies_in_the_channel_with_memory_per_channel(start_bot, fake):
    bot = await start_bot(slack_reply_in_thread=False)
    await bot.send(event_body(mention("one")))
    await answered(fake, 1)
    await bot.send(event_body(mention("two")))
    posts = await answered(fake, 2)
    assert all("thread_ts" not in p.params for p in posts)
    assert [e.user for e in await bot.engine.history("slack:T1:C1")] == ["one", "two"]


async def test_http_direct_messages_have_memory_per_dm_channel(start_bot, fake):
    bot = await start_bot()
    first, second = dm("hello bot"), dm("still me")
    await bot.send(event_body(first))
    await answered(fake, 1)
    await bot.send(event_body(second))
    posts = await answered(fake, 2)
    # Each answer in the thread of its message (Slack's agent experience), one memory for the DM.
    assert [(p.params["channel"], p.params["thread_ts"]) for p in posts] == [("D1", first["ts"]), ("D1", second["ts"])]
    assert [e.user for e in await bot.engine.history("slack:T1:D1")] == ["hello bot", "still me"]


async def test_http_long_answers_are_split_in_order(start_bot, fake):
    words = [f"word{i}" if i % 100 else "fish&chips" for i in range(1300)]
    long_answer = " ".join(words)
    assert len(long_answer) > 10_000
    bot = await start_bot(reply=long_answer)
    event = mention("tell me everything")
    await bot.send(event_body(event))
    await wait_for(lambda: fake.posts and not fake.thinking, what="the whole answer")
    posts = fake.posts
    assert len(posts) >= 3
    assert all(len(p.params["text"]) <= 3000 for p in posts)  # the last one fits a section block
    assert all(p.params["thread_ts"] == event["ts"] for p in posts)
    assert " ".join(p.params["text"] for p in posts).replace("&amp;", "&").split() == words


async def test_http_rate_limited_post_is_retried_and_posted_once(start_bot, fake):
    bot = await start_bot()
    fake.rate_limit_once("chat.postMessage", retry_after=1)
    await bot.send(event_body(mention("hello")))
    await answered(fake)
    assert len(fake.calls_to("chat.postMessage", ok_only=False)) == 2
    assert len(fake.posts) == 1


async def test_http_replies_keep_the_order_of_messages_while_rate_limited(start_bot, fake):
    bot = await start_bot(echo=True)
    fake.rate_limit_once("chat.postMessage", retry_after=2)
    for text in ("first", "second", "third"):
        await bot.send(event_body(dm(text)))
    posts = await answered(fake, 3)
    assert [p.params["text"] for p in posts] == ["re: first", "re: second", "re: third"]
    thinking = [c.params["status"] for c in fake.status_calls("D1")]
    assert thinking.count("is thinking...") == 3 and thinking[-1] == ""  # one status per message, cleared
    await wait_for(lambda: len(bot.engine._lines) == 0, what="every place in line released")


async def test_http_reset_forgets_the_thread_and_confirms(start_bot, fake):
    bot = await start_bot()
    top = mention("remember this")
    await bot.send(event_body(top))
    await answered(fake, 1)
    await bot.send(event_body(mention("reset", thread_ts=top["ts"])))
    posts = await answered(fake, 2)
    assert posts[1].params["text"] == RESET_DONE and posts[1].params["thread_ts"] == top["ts"]
    assert await bot.engine.history(f"slack:T1:C1:{top['ts']}") == []
    await bot.send(event_body(dm("forget")))
    posts = await answered(fake, 3)
    assert posts[2].params["text"] == RESET_DONE
    assert len(bot.model.inputs) == 1


async def test_http_errors_become_a_short_reply_in_the_thread(start_bot, fake):
    bot = await start_bot(max_input_chars=20)
    event = mention("this message is much longer than twenty characters")
    await bot.send(event_body(event))
    [post] = await answered(fake)
    assert "too long" in post.params["text"] and post.params["thread_ts"] == event["ts"]
    await bot.send(event_body(mention("")))  # just the mention: nothing to answer
    posts = await answered(fake, 2)
    assert "empty" in posts[1].params["text"]
    assert bot.model.inputs == []


async def test_http_allow_lists_limit_teams_and_channels(start_bot, fake):
    bot = await start_bot(slack_team_ids=frozenset({"T1"}), slack_channel_ids=frozenset({"CALLOWED"}))
    await bot.send(event_body(mention("other team", channel="CALLOWED"), team="T9"))
    await bot.send(event_body(mention("other channel", channel="C1")))
    await bot.send(event_body(mention("allowed", channel="CALLOWED")))
    await sentinel(bot, fake, already=1)
    assert sorted(p.params["channel"] for p in fake.posts) == ["CALLOWED", "DSENTINEL"]


@pytest.mark.parametrize("followups", [True, False])
async def test_http_thread_followups_without_a_mention(start_bot, fake, followups):
    bot = await start_bot(slack_thread_followups=followups)
    top = mention("start a thread")
    await bot.send(event_body(top))
    await answered(fake, 1)

    def in_thread(text: str, thread: str) -> dict[str, Any]:
        return {"type": "message", "channel_type": "channel", "user": "U2", "text": text, "ts": new_ts(),
                "channel": "C1", "thread_ts": thread}

    await bot.send(event_body(in_thread("and another thing", top["ts"])))
    await bot.send(event_body(in_thread("a thread I never answered", "123.456")))
    await sentinel(bot, fake, already=2 if followups else 1)
    in_c1 = [p for p in fake.posts if p.params["channel"] == "C1"]
    assert len(in_c1) == (2 if followups else 1)
    assert all(p.params["thread_ts"] == top["ts"] for p in in_c1)


async def test_http_shutdown_finishes_replies_in_flight_and_refuses_new_events(start_bot, fake):
    bot = await start_bot(delay=1.0)
    await bot.send(event_body(mention("answer me before you go")))
    await wait_for(lambda: bot.model.inputs, what="the model to start")
    bot.adapter.stop_accepting()
    status, _ = await bot.send(event_body(mention("too late")))
    assert status >= 500  # not acked: Slack delivers it again later
    assert await bot.adapter.drain(20)
    assert len(fake.posts) == 1 and len(bot.model.inputs) == 1


async def test_start_fails_clearly_with_a_bad_token(fake, tiny_model, make_settings):
    settings = make_settings(slack_bot_token="not-a-token", slack_signing_secret=SECRET, slack_api_url=fake.api_url)
    adapter = SlackAdapter(settings, ReplyEngine(tiny_model, InProcessStore(max_turns=5), settings))
    with pytest.raises(SlackStartError, match="invalid_auth"):
        await adapter.start()
    assert not adapter.connected


async def test_rejected_requests_are_not_logged_with_their_text(start_bot, fake, caplog):
    caplog.set_level("INFO")
    bot = await start_bot()
    raw = json.dumps(event_body(mention("a private thought")))
    assert (await bot.send(raw, headers={"X-Slack-Signature": "v0=bad"}))[0] == 401
    assert "a private thought" not in caplog.text


# -- Socket Mode --------------------------------------------------------------


async def test_socket_mode_start_fails_clearly_with_a_bad_app_token(fake, tiny_model, make_settings):
    settings = make_settings(slack_bot_token="xoxb-test", slack_app_token="xoxb-not-an-app-token",
                             slack_api_url=fake.api_url)
    adapter = SlackAdapter(settings, ReplyEngine(tiny_model, InProcessStore(max_turns=5), settings))
    started = time.monotonic()
    with pytest.raises(SlackStartError, match="SLACK_APP_TOKEN: invalid_auth"):
        await adapter.start()
    assert time.monotonic() - started < 10  # not the Socket Mode client's endless retries
    assert not adapter.connected
    await adapter.close()


async def test_socket_mode_acks_answers_once_and_ignores_retries(start_bot, fake):
    bot = await start_bot(socket_mode=True)
    assert bot.adapter.connected
    assert fake.calls_to("apps.connections.open")[0].token == "xapp-test"
    body = event_body(mention("hello over the socket"))
    envelope = await fake.send_envelope(body)
    await wait_for(lambda: fake.acked(envelope), what="the ack")
    [post] = await answered(fake)
    assert post.params["thread_ts"] == body["event"]["ts"]
    retry = await fake.send_envelope(body, retry_attempt=1)
    await wait_for(lambda: fake.acked(retry), what="the retry's ack")
    await fake.send_envelope(event_body(dm("sentinel", channel="DSENTINEL")))
    await answered(fake, 2)
    assert [p.params["channel"] for p in fake.posts] == ["C1", "DSENTINEL"]


async def test_socket_mode_serves_no_http_endpoint(start_bot, fake):
    bot = await start_bot(socket_mode=True)
    status, _ = await bot.send(event_body(mention("Socket Mode has no secret to check this with")))
    assert status == 404
    assert fake.posts == [] and bot.model.inputs == []


async def test_socket_mode_reconnects_after_disconnect(start_bot, fake):
    bot = await start_bot(socket_mode=True)
    await fake.send_disconnect()
    await wait_for(lambda: len(fake.calls_to("apps.connections.open")) == 2, what="a new apps.connections.open")
    await wait_for(lambda: len(fake.open_sockets) == 1 and fake.sockets[-1] is fake.open_sockets[0],
                   what="the new connection to replace the old one")
    await wait_for(lambda: bot.adapter.connected, what="connected again")
    envelope = await fake.send_envelope(event_body(mention("still there?")))
    await wait_for(lambda: fake.acked(envelope), what="the ack on the new connection")
    await answered(fake)


async def test_socket_mode_refuses_to_ack_while_shutting_down(start_bot, fake):
    bot = await start_bot(socket_mode=True)
    bot.adapter.stop_accepting()
    envelope = await fake.send_envelope(event_body(mention("late")))
    await asyncio.sleep(1.0)  # an ack would come within milliseconds
    assert not fake.acked(envelope)
    assert fake.posts == [] and bot.model.inputs == []


# -- the dedupe store ----------------------------------------------------------


async def test_dedupe_store_expires_and_stays_bounded():
    now = [0.0]
    store = InProcessDedupe(max_keys=3, clock=lambda: now[0])
    assert await store.first_time("a", 10) and not await store.first_time("a", 10)
    now[0] = 11.0
    assert await store.first_time("a", 10)  # expired
    for key in "bcde":
        assert await store.first_time(key, 100)
    assert len(store) == 3
    assert await store.first_time("b", 100)  # the oldest was forgotten to stay within the bound


# -- the whole process: `python -m bot run` against the fakes ---------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_bot(tmp_path: Path, blenderbot_dir: Path, **env: str) -> tuple[asyncio.subprocess.Process, str, Path]:
    port = free_port()
    log_path = tmp_path / "bot.log"
    full_env = subprocess_env(
        BLENDERBOT_MODEL=str(blenderbot_dir), BLENDERBOT_MAX_NEW_TOKENS="8", BLENDERBOT_NUM_BEAMS="1",
        DATA_DIR=str(tmp_path), MEMORY_URL=f"sqlite:///{tmp_path}/memory.db",
        HTTP_HOST="127.0.0.1", HTTP_PORT=str(port), SLACK_BOT_TOKEN="xoxb-test", **env,
    )
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 120
        while True:
            assert process.returncode is None, log_path.read_text()
            try:
                async with session.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "not ready in time:\n" + log_path.read_text()
            await asyncio.sleep(0.2)
    return process, base, log_path


async def stop_bot(process: asyncio.subprocess.Process, log_path: Path) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError("did not stop on SIGTERM:\n" + log_path.read_text()) from None
    assert process.returncode == 0, log_path.read_text()


async def test_run_command_answers_slack_in_http_mode(fake, blenderbot_dir, tmp_path):
    process, base, log_path = await run_bot(tmp_path, blenderbot_dir, SLACK_SIGNING_SECRET=SECRET,
                                            SLACK_API_URL=fake.api_url)
    try:
        event = mention("hello from http")
        raw = json.dumps(event_body(event))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/slack/events", data=raw, headers={"X-Slack-Signature": "v0=bad"}) as r:
                assert r.status == 401
            async with session.post(f"{base}/slack/events", data=raw, headers=signed_headers(SECRET, raw)) as r:
                assert r.status == 200
        [post] = await answered(fake)
        assert post.params["thread_ts"] == event["ts"] and post.params["text"].strip()
    finally:
        await stop_bot(process, log_path)
    assert "hello from http" not in log_path.read_text()  # user text is not logged at INFO


async def test_run_command_answers_slack_in_socket_mode(fake, blenderbot_dir, tmp_path):
    process, _, log_path = await run_bot(tmp_path, blenderbot_dir, SLACK_APP_TOKEN="xapp-test",
                                         SLACK_API_URL=fake.api_url)
    try:
        await wait_for(lambda: fake.open_sockets, what="a Socket Mode connection")
        envelope = await fake.send_envelope(event_body(dm("hello from the socket")))
        await wait_for(lambda: fake.acked(envelope), what="the ack")
        [post] = await answered(fake)
        assert post.params["channel"] == "D1"
    finally:
        await stop_bot(process, log_path)


# -- order, files, follow-ups after a restart, broken connections, a revoked token -----


def in_thread(text: str, thread: str, **extra: Any) -> dict[str, Any]:
    """A channel message in a thread, without a mention (a follow-up)."""
    return {"type": "message", "channel_type": "channel", "user": "U2", "text": text, "ts": new_ts(),
            "channel": "C1", "thread_ts": thread, **extra}


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


async def test_a_slow_first_claim_does_not_let_the_next_message_overtake(start_bot, fake, slow_redis):
    proxy, client, prefix = slow_redis
    bot = await start_bot(echo=True, inbox_store=RedisInbox("", prefix=prefix, client=client))  # the replicas' inbox
    proxy.delay_next(b"claim:slack:", 1.5)  # the first message's claim waits on a slow network
    for text in ("my name is Ada", "what is my name?"):
        assert (await bot.send(event_body(dm(text))))[0] == 200
    posts = await answered(fake, 2)
    assert [p.params["text"] for p in posts] == ["re: my name is Ada", "re: what is my name?"]
    assert [e.user for e in await bot.engine.history("slack:T1:D1")] == ["my name is Ada", "what is my name?"]
    assert bot.model.inputs[1][:2] == ["my name is Ada", "re: my name is Ada"]  # the second saw the first
    assert proxy.count(b"claim:slack:") == 4  # each message: its claim, then its done mark


async def test_socket_mode_acks_an_event_only_once_it_is_recorded(start_bot, fake, slow_redis):
    proxy, client, prefix = slow_redis
    await start_bot(socket_mode=True, echo=True, inbox_store=RedisInbox("", prefix=prefix, client=client))
    proxy.delay_next(b"claim:slack:", 1.0)  # recording the message waits on a slow network
    event = dm("remember this one")
    envelope = await fake.send_envelope(event_body(event))
    await asyncio.sleep(0.5)
    assert not fake.acked(envelope)  # not recorded yet: killed now, Slack would deliver it again
    await wait_for(lambda: fake.acked(envelope), what="the ack once recorded")
    [post] = await answered(fake, 1)
    assert post.params["text"] == "re: remember this one"
    assert await client.get(f"{prefix}claim:slack:T1:D1:{event['ts']}") == b"done"


async def test_a_message_with_a_file_is_answered_for_its_text(start_bot, fake):
    bot = await start_bot(echo=True, slack_thread_followups=True)
    files = [{"id": "F1", "name": "screenshot.png", "mimetype": "image/png"}]
    await bot.send(event_body(dm("what's this?", subtype="file_share", files=files)))
    [post] = await answered(fake, 1)
    assert post.params["text"] == "re: what's this?"
    await bot.send(event_body(dm("", subtype="file_share", files=files)))  # only a file
    await bot.send(event_body({**mention(""), "files": files}))  # a mention and a file, no words
    posts = await answered(fake, 3)
    assert [p.params["text"] for p in posts[1:]] == [FILE_ONLY, FILE_ONLY]
    # A thread reply also sent to the channel, in a thread the bot is in, is a follow-up like any other.
    top = mention("start a thread")
    await bot.send(event_body(top))
    await answered(fake, 4)
    await bot.send(event_body(in_thread("also sent to the channel", top["ts"], subtype="thread_broadcast")))
    posts = await answered(fake, 5)
    assert posts[4].params["text"] == "re: also sent to the channel" and posts[4].params["thread_ts"] == top["ts"]
    assert [turns[-1] for turns in bot.model.inputs] == ["what's this?", "start a thread", "also sent to the channel"]


async def test_thread_followups_survive_a_restart(start_bot, fake, tmp_path):
    """Which threads the bot is in comes from the conversation memory, not from the
    process: a new process on the same SQLite file still follows the thread."""
    settings = {"slack_thread_followups": True, "memory_url": f"sqlite:///{tmp_path / 'memory.db'}"}
    first = await start_bot(**settings)
    top = mention("start a thread")
    await first.send(event_body(top))
    await answered(fake, 1)
    first.adapter.stop_accepting()
    await first.adapter.close()
    await first.engine.close()

    second = await start_bot(**settings)  # the restarted bot
    await second.send(event_body(in_thread("and another thing", top["ts"])))
    await second.send(event_body(in_thread("a thread I never answered", "123.456")))
    await sentinel(second, fake, already=2)
    in_c1 = [p for p in fake.posts if p.params["channel"] == "C1"]
    assert len(in_c1) == 2 and all(p.params["thread_ts"] == top["ts"] for p in in_c1)
    history = await second.engine.history(f"slack:T1:C1:{top['ts']}")
    assert [e.user for e in history] == ["start a thread", "and another thing"]


async def test_a_followup_sent_while_the_mention_is_being_answered_counts(start_bot, fake):
    bot = await start_bot(delay=1.0, echo=True, slack_thread_followups=True)
    top = mention("start a thread")
    await bot.send(event_body(top))
    await wait_for(lambda: bot.model.inputs, what="the model to start on the mention")
    await bot.send(event_body(in_thread("and one more thing", top["ts"])))  # before the answer is there
    posts = await answered(fake, 2)
    assert [p.params["text"] for p in posts] == ["re: start a thread", "re: and one more thing"]
    # The thinking status went up for each of the two, on the thread both answers went to.
    statuses = [(c.params["thread_ts"], c.params["status"]) for c in fake.status_calls("C1")]
    assert statuses.count((top["ts"], STATUS)) >= 2 and statuses[-1] == (top["ts"], "")


async def test_a_broken_connection_while_posting_still_sends_the_whole_answer(start_bot, fake):
    words = [f"word{i}" for i in range(1300)]
    bot = await start_bot(reply=" ".join(words))
    fake.break_next("chat.postMessage", "payload")  # the first chunk is posted, its answer breaks off
    fake.break_next("chat.postMessage", "disconnect", times=2)  # the second: two dropped connections
    event = mention("tell me everything")
    fake.add_message(event["channel"], event["ts"], event["text"], event["user"])  # the thread's root, as Slack has it
    await bot.send(event_body(event))
    await wait_for(lambda: [c for c in fake.status_calls("C1") if c.params["status"] == ""],
                   what="the thinking status cleared after the last chunk")
    posted = [p.params["text"] for p in fake.posts]
    assert len(posted) >= 3
    assert " ".join(posted).split() == words  # every chunk once, in order
    assert len(fake.calls_to("chat.postMessage", ok_only=False)) == len(posted) + 2  # + the two dropped


@pytest.mark.parametrize("where", ["thread", "dm"])
async def test_an_answer_whose_post_reached_slack_but_whose_reply_was_lost_is_not_posted_again(start_bot, fake, where):
    # Slack stores the answer, and the connection drops before its reply comes back: trying the
    # post again blindly (slack_sdk's own retry of a reset connection did) posts it twice.
    bot = await start_bot()
    fake.break_next("chat.postMessage", "done-disconnect")
    event = mention("hello there") if where == "thread" else dm("hello there")
    fake.add_message(event["channel"], event["ts"], event["text"], event["user"])
    await bot.send(event_body(event))
    await wait_for(lambda: not fake.thinking and fake.posts and not bot.adapter._tasks, what="the answer handled")
    await asyncio.sleep(0.5)  # a second post would come within this
    assert len(fake.posts) == 1


@pytest.mark.parametrize("method", ["assistant.threads.setStatus", "reactions.add"])
async def test_a_dropped_connection_on_the_thinking_hint_costs_only_the_hint(start_bot, fake, caplog, method):
    # The hourglass goes on a channel message answered in the channel: no thread for a status.
    bot = await start_bot(slack_reply_in_thread=(method != "reactions.add"))
    fake.break_next(method, "disconnect", times=2)  # slack_sdk retries once by itself
    await bot.send(event_body(mention("hello")))
    [post] = await answered(fake, 1)
    assert post.params["text"].strip()
    await wait_for(lambda: len(bot.adapter._tasks) == 0, what="the reply task to end")
    if method == "reactions.add":  # the hourglass never went up: nothing to take down
        assert fake.calls_to("reactions.remove", ok_only=False) == []
    else:  # Slack did not take the status: the hourglass instead, and taken down
        assert fake.calls_to("reactions.add") and fake.calls_to("reactions.remove")
    assert not fake.thinking
    assert "A reply task failed" not in caplog.text


async def test_a_token_revoked_after_start_up_makes_healthz_fail(start_bot, fake, caplog):
    bot = await start_bot()
    client = TestClient(TestServer(build_app(bot.engine, bot.adapter.settings, [bot.adapter]), host="127.0.0.1",
                                   port=0))  # fmt: skip
    await client.start_server()
    try:
        await bot.send(event_body(dm("hello")))
        await answered(fake, 1)
        assert (await client.get("/healthz")).status == 200
        fake.revoked = True  # the app was uninstalled from the workspace
        await bot.send(event_body(dm("are you there?")))
        await wait_for(lambda: fake.calls_to("chat.postMessage", ok_only=False)[1:], what="the refused post")
        response = await wait_for_status(client, "/healthz", 503)
        reason = (await response.json())["reason"]
        assert reason.startswith("slack: ") and "SLACK_BOT_TOKEN" in reason and "token_revoked" in reason
        assert (await client.get("/healthz")).status == 503
        assert len([r for r in caplog.records if r.levelname == "ERROR" and "SLACK_BOT_TOKEN" in r.message]) == 1
    finally:
        await client.close()


async def wait_for_status(client: TestClient, path: str, status: int, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(path)
        if response.status == status:
            return response
        assert time.monotonic() < deadline, f"{path} stayed {response.status}"
        await asyncio.sleep(0.05)
