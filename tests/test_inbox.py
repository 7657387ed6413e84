"""Every accepted message answered exactly once (bot/inbox): the claims and the
inbox on the real SQLite file and the real Redis, and `blender-chat run` killed
with SIGKILL while Discord messages are in flight, then started again."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest
from bot_process import BotProcess, port_env
from fake_discord import BOT_ID, CHANNEL_ID, DM_CHANNEL_ID, OTHER_CHANNEL_ID, FakeDiscord
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)

from bot.config import Settings
from bot.inbox import ACCEPTED, DONE, HELD, Entry, Inbox
from bot.inbox.redis import RedisInbox
from bot.inbox.sqlite import SQLiteInbox
from bot.metrics import Metrics

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


async def test_a_dead_processes_messages_are_replayed_once_in_arrival_order(tmp_path):
    settings = Settings(inbox_lease=0.3, inbox_max_age=600.0)
    dead = Inbox(SQLiteInbox(tmp_path / "memory.db"), settings)
    await dead.open()
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


def _bot(tmp_path, fake: FakeDiscord, blenderbot_dir, name: str, **extra: str) -> BotProcess:
    env = {
        "DISCORD_TOKEN": fake.token, "DISCORD_API_URL": fake.api_url, "DISCORD_GATEWAY_URL": fake.gateway_url,
        "BLENDERBOT_MODEL": str(blenderbot_dir), "BLENDERBOT_MAX_NEW_TOKENS": "6", "BLENDERBOT_NUM_BEAMS": "1",
        "MEMORY_URL": f"sqlite:///{tmp_path}/memory.db", "SAFETY": "off", "INBOX_LEASE": "2s",
        **port_env(), **extra,
    }  # fmt: skip
    return BotProcess(tmp_path / f"{name}.log", **env)


@pytest.fixture
async def discord_bots(tmp_path, blenderbot_dir):
    """The fake Discord, and `start(name, **env)`: a ready `blender-chat run` on it
    (one SQLite file for all of them); every process is killed at the end."""
    fake = FakeDiscord()
    await fake.start()
    processes: list[BotProcess] = []

    async def start(name: str, **extra: str) -> BotProcess:
        process = _bot(tmp_path, fake, blenderbot_dir, name, **extra)
        processes.append(process)
        await asyncio.to_thread(process.wait_ready, 120)
        return process

    yield fake, start
    for process in processes:
        process.close()
    await fake.stop()


def _kill(process: BotProcess) -> None:
    process.signal(signal.SIGKILL)
    process.wait(30)


def _answers(fake: FakeDiscord) -> list[dict]:
    """The bot's messages that exist on Discord (a request still held on its way is none)."""
    return [message for message in fake.messages.values() if int(message["author"]["id"]) == BOT_ID]


def _replies_to(fake: FakeDiscord, message_id: int) -> list[dict]:
    return [
        message for message in _answers(fake)
        if int((message.get("message_reference") or {}).get("message_id", 0)) == message_id
    ]  # fmt: skip


async def _history(process: BotProcess, channel: int) -> list[str]:
    """What the conversation of a Discord channel remembers, from the SQLite file itself."""
    import sqlite3

    path = process.log_path.parent / "memory.db"
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT user_text FROM exchanges WHERE conversation = ? ORDER BY id", (f"discord:{channel}",)
        ).fetchall()
    return [text for (text,) in rows]


def _metric(process: BotProcess, name: str, **labels: str) -> float:
    from bot_process import metric

    return metric(process.base, name, **labels)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def _send_in_flight(fake: FakeDiscord) -> dict[int, list[int]]:
    """Messages in three conversations; each conversation's first answer is held by
    Discord on its way (so the rest wait behind it). The message ids per channel, in order."""
    sent: dict[int, list[int]] = {CHANNEL_ID: [], OTHER_CHANNEL_ID: [], DM_CHANNEL_ID: []}
    for channel in sent:
        fake.delay("POST", f"/channels/{channel}/messages", 600)  # longer than the test: never reaches Discord
    for n in range(20):
        channel = list(sent)[n % 3]
        mention = () if channel == DM_CHANNEL_ID else (BOT_ID,)
        text = f"message {n}" if channel == DM_CHANNEL_ID else f"{MENTION} message {n}"
        sent[channel].append(await fake.send_message(text, channel_id=channel, mentions=mention))
    await fake.wait_for(lambda: fake.held == 3, timeout=60, what="an answer held in each conversation")

    def typing() -> int:  # each message shows typing once it is recorded and in line
        return sum(1 for call in fake.calls if call.path.endswith("/typing"))

    await fake.wait_for(lambda: typing() >= 20, timeout=60, what="all 20 messages taken in")
    return sent


@pytest.mark.timeout(300)
async def test_killed_with_20_messages_in_flight_every_one_is_answered_once_after_the_restart(discord_bots):
    fake, start = discord_bots
    first = await start("first")
    sent = await _send_in_flight(fake)
    assert _answers(fake) == []  # nothing delivered yet
    _kill(first)

    second = await start("second")
    everything = [message for messages in sent.values() for message in messages]
    await fake.wait_for(lambda: len(_answers(fake)) >= 20, timeout=120, what="20 answers after the restart")
    await asyncio.sleep(3)  # a second scan, to be sure nothing is answered twice
    assert sorted(len(_replies_to(fake, message)) for message in everything) == [1] * 20
    assert len(_answers(fake)) == 20
    for channel, messages in sent.items():
        texts = [fake.messages[message]["content"].removeprefix(MENTION).strip() for message in messages]
        assert await _history(second, channel) == texts  # each conversation in the order it was said
    assert _metric(second, "blenderchat_inbox_replayed_total", platform="discord") == 20
    assert _metric(second, "blenderchat_inbox_depth") == 0
    assert "Answering 20 messages left unanswered by a stopped process" in second.log


@pytest.mark.timeout(300)
async def test_an_answer_posted_just_before_the_kill_is_not_posted_again(discord_bots):
    fake, start = discord_bots
    first = await start("first")
    # Discord creates the answer, and the process dies before it hears so (before the inbox ack).
    fake.hold_response("POST", f"/channels/{CHANNEL_ID}/messages")
    message = await fake.send_message(f"{MENTION} hello there", mentions=(BOT_ID,))
    await fake.wait_for(lambda: fake.withheld, timeout=60, what="the answer created")
    _kill(first)
    fake.release_held()

    second = await start("second")
    await fake.wait_for(
        lambda: _metric(second, "blenderchat_inbox_replayed_total", platform="discord") == 1,
        timeout=60, what="the replay",
    )  # fmt: skip
    await fake.wait_for(lambda: any(call.deduplicated for call in fake.calls), timeout=30, what="the resend")
    assert len(_replies_to(fake, message)) == 1  # Discord knew the nonce: one answer, not two
    assert await _history(second, CHANNEL_ID) == ["hello there"]  # and remembered once


@pytest.mark.timeout(300)
async def test_messages_older_than_inbox_max_age_are_not_answered_after_a_restart(discord_bots):
    fake, start = discord_bots
    first = await start("first")
    await _send_in_flight(fake)
    _kill(first)
    await asyncio.sleep(3)

    second = await start("second", INBOX_MAX_AGE="2s")
    await fake.wait_for(
        lambda: _metric(second, "blenderchat_inbox_expired_total", platform="discord") == 20,
        timeout=60, what="the old messages dropped",
    )  # fmt: skip
    assert _answers(fake) == []
    assert "Dropped 20 unanswered messages older than INBOX_MAX_AGE=2s (discord 20)" in second.log
