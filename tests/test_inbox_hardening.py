"""The inbox's second round of hardening (issue 22): a store error in the middle of a
replay scan, a Slack retry taking over a dead replica's claim, a conversation's order
and its "forget" across a crash, entries of platforms this process does not run, and
what the stores keep. On the real SQLite file and the real Redis (a key prefix per
test), the Slack adapter through slack_bolt against the fake Slack."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from bot_process import sample
from fake_discord import BOT_ID, CHANNEL_ID
from fake_slack import event_body, mention, wait_for
from redis_servers import PrivateRedis, delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from test_inbox import (  # noqa: F401 (bots, on_redis: fixtures)
    HELD_FOR_GOOD,
    MENTION,
    Conversation,
    _discord_answers,
    _kill,
    _marker,
    _metric,
    _remembered,
    _slack_answers,
    bots,
    on_redis,
)
from test_slack import fake, start_bot  # noqa: F401 (fixtures: the fake Slack, an adapter over a real engine)

from bot.config import Settings
from bot.inbox import ACCEPTED, HELD, Claim, Entry, Inbox
from bot.inbox.redis import RedisInbox
from bot.inbox.sqlite import SQLiteInbox
from bot.metrics import Metrics


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path, redis_url):
    """`make_store()`: a new, unopened inbox store on this test's SQLite file or Redis prefix
    (every store made by one test shares it, as processes share the file or the server)."""
    prefix = unique_prefix()
    if request.param == "redis":
        request.addfinalizer(lambda: delete_prefix(redis_url, prefix))

    def make():
        if request.param == "sqlite":
            return SQLiteInbox(tmp_path / "memory.db")
        return RedisInbox(redis_url, prefix=prefix)

    make.kind = request.param
    return make


@pytest.fixture
async def opened(make_store):
    """`await opened()`: a store from make_store, opened, closed at the end."""
    stores = []

    async def open_one():
        store = make_store()
        await store.open()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


def entry(text: str = "hello", *, conversation: str = "discord:1", platform: str = "discord",
          arrived: float | None = None) -> Entry:
    return Entry(f"test:{uuid.uuid4().hex}", platform, conversation, "u1", text, {"channel": 1},
                 arrived=time.time() if arrived is None else arrived)  # fmt: skip


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return sample(metrics.render().decode(), name, **labels)


class FailingOnce:
    """A real store whose `nth` call of `method` raises once, as a "database is locked"
    or a Redis blip would; everything else goes to the store."""

    def __init__(self, store: Any, method: str, nth: int) -> None:
        self._store, self._method, self._left = store, method, nth

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name != self._method:
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._left -= 1
            if self._left == 0:
                raise ConnectionError("the store blinked")
            return await attribute(*args, **kwargs)

        return call


# -- item 2: one store error in a scan strands nothing ---------------------------------


async def test_a_store_error_in_the_middle_of_a_scan_strands_no_claim(opened):
    settings = Settings(inbox_lease=0.3, inbox_max_age=600.0)
    dead = Inbox(await opened(), settings)
    for text in ("A", "B"):
        assert await dead.accept(entry(text)) is not None  # then that process is killed
    await asyncio.sleep(0.5)
    live = Inbox(FailingOnce(await opened(), "reclaim", nth=2), settings)  # B's reclaim fails, once
    replayed: list[Claim] = []
    live._replayers = {"discord": replayed.append}
    await live.scan()
    await asyncio.sleep(0.5)  # on Redis, an entry is looked at again once idle for a lease
    await live.scan()
    assert [claim.entry.text for claim in replayed] == ["A", "B"]  # A was claimed before the error: replayed
    for claim in replayed:
        await live.finish(claim)
    assert await live.store.depth() == 0


# -- item 4: a retry that takes over a dead holder's claim is a replay ------------------


async def test_accepting_a_message_whose_holder_died_says_it_took_it_over(opened):
    store = await opened()
    message = entry()
    assert (await store.accept(message, "process-a", 0.3))[0] == ACCEPTED
    assert (await store.accept(message, "process-b", 0.3))[0] == HELD
    await asyncio.sleep(0.5)  # a died: its lease lapsed, and Slack retries
    assert (await store.accept(message, "process-b", 0.3))[0] == "taken"
    settings = Settings(inbox_lease=0.3)
    await asyncio.sleep(0.5)
    claim = await Inbox(store, settings).accept(message)
    assert claim is not None and claim.replayed  # its answer may be out already: check before posting
    fresh = await Inbox(store, settings).accept(entry())
    assert fresh is not None and not fresh.replayed


async def test_a_slack_retry_taking_over_a_dead_replicas_claim_does_not_post_the_answer_again(
    start_bot, fake, make_store, tmp_path  # noqa: F811 (fixtures)
):
    # Two replicas on one inbox and one memory. A posts the answer; Slack has it, A never hears
    # so and dies (its reply cut off) before marking it done. Slack's retry reaches B after
    # A's lease lapsed: B answers it as a replay, reads the thread and finds the answer there.
    shared = {"memory_url": f"sqlite:///{tmp_path}/memory.db", "inbox_lease": 1.0}
    a = await start_bot(echo=True, inbox_store=make_store(), **shared)
    b = await start_bot(echo=True, inbox_store=make_store(), **shared)
    fake.hold_response("chat.postMessage")
    event = mention("hello there")
    fake.add_message("C1", event["ts"], event["text"], event["user"])
    assert (await a.send(event_body(event)))[0] == 200
    await wait_for(lambda: fake.withheld, what="A's answer stored by Slack")
    a.adapter.stop_accepting()
    assert not await a.adapter.drain(0.1)  # A is gone mid-answer: its claim is left to lapse
    await asyncio.sleep(1.5)
    assert (await b.send(event_body(event), retry=1))[0] == 200
    await wait_for(lambda: fake.calls_to("conversations.replies"), what="B reading the thread")
    await wait_for(lambda: not fake.thinking, what="B done")
    fake.release_held()
    await asyncio.sleep(0.5)  # a second post would be on its way by now
    for bot in (a, b):
        await bot.adapter.inbox.close()
    answers = [m for m in fake.messages["C1"] if m["user"] == "UBOT" and m.get("thread_ts") == event["ts"]]
    assert len(answers) == 1, answers
    assert _sample(b.engine.metrics, "blenderchat_inbox_duplicates_prevented_total", platform="slack") == 1


# -- item 7: a conversation's order, and its "forget", across a crash ----------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def memory(request, tmp_path, redis_url):
    """An opened conversation store of each kind."""
    from bot.memory import open_store

    prefix = unique_prefix()
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/memory.db",
           "redis": f"{redis_url}?prefix={prefix}"}[request.param]  # fmt: skip
    store = open_store(url, max_turns=10)
    await store.open()
    yield store
    await store.close()
    delete_prefix(redis_url, prefix)


async def test_an_answer_to_a_message_asked_before_a_reset_is_not_stored_after_it(memory):
    asked = time.time()
    await memory.append_exchange("c", "my name is Ada", "hi Ada", exchange_id="e1", asked_at=asked - 5)
    await memory.reset("c", at=asked)  # "forget", after the next message was asked
    assert await memory.append_exchange("c", "my card is 1234", "ok", exchange_id="e2", asked_at=asked - 1) is None
    assert await memory.history("c") == []  # the replayed message's text does not come back
    stored = await memory.append_exchange("c", "hello again", "hello", exchange_id="e3", asked_at=asked + 1)
    assert stored is not None and [e.user for e in await memory.history("c")] == ["hello again"]
    assert await memory.append_exchange("c", "no time given", "fine") is not None  # (the terminal chat)


async def test_a_message_replayed_after_a_reset_that_came_after_it_is_answered_not_remembered(
    make_settings, tiny_model, tmp_path
):
    from bot.engine import ReplyEngine
    from bot.memory import open_store

    settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db")
    async with ReplyEngine(tiny_model, open_store(settings.memory_url, max_turns=10), settings) as engine:
        arrived = time.time()
        await engine.reset("discord:1")  # "forget", sent after the message below (answered by another process)
        ticket = engine.take_ticket("discord:1", arrived=arrived - 1)  # its replay
        reply = await engine.respond("discord:1", "my card is 1234", ticket=ticket, exchange_id="e1")
        ticket.release()
        assert reply.text and reply.exchange is None  # answered, not remembered
        assert await engine.history("discord:1") == []
        later = await engine.respond("discord:1", "hello again", exchange_id="e2")
        assert [e.user for e in await engine.history("discord:1")] == ["hello again"] and later.exchange


async def test_a_replayed_message_goes_ahead_of_newer_ones_that_have_not_started(make_settings, tiny_model):
    from bot.engine import ReplyEngine
    from bot.memory.inprocess import InProcessStore

    engine = ReplyEngine(tiny_model, InProcessStore(max_turns=10), make_settings())
    earliest = engine.take_ticket("c")  # came before the messages waiting elsewhere: not held
    await asyncio.sleep(0.3)
    live = engine.take_ticket("c")  # a new message, taken in while older ones wait
    older_arrived = [earliest.arrived + 0.1, earliest.arrived + 0.2]  # (another process took those in)
    release = engine.hold_line("c", after=older_arrived[-1])
    turns: list[str] = []

    async def take(name, ticket):
        await ticket.turn()
        turns.append(name)
        ticket.release()

    waiting = [asyncio.create_task(take("earliest", earliest)), asyncio.create_task(take("new", live))]
    await asyncio.sleep(0.05)
    assert turns == ["earliest"]  # the new one is held: older messages of the conversation are waiting
    older = [engine.take_ticket("c", arrived=arrived) for arrived in older_arrived]  # their replays
    release()
    await asyncio.gather(*waiting, *(take(f"old {n}", ticket) for n, ticket in enumerate(older)))
    assert turns == ["earliest", "old 0", "old 1", "new"]


async def test_a_message_whose_turn_has_started_is_not_held_back():
    # A Slack follow-up takes its turn to check the thread, then again to be answered: a hold
    # placed in between (a newer message found older ones waiting) must not stop it mid-turn.
    from bot.locks import ConversationLines

    lines = ConversationLines()
    ticket = lines.take("c")
    await ticket.turn()
    release = lines.hold("c", after=ticket.arrived - 1)
    await asyncio.wait_for(ticket.turn(), 1)
    release()


@pytest.mark.timeout(30)
async def test_two_live_replicas_answer_one_conversation_in_arrival_order_without_waiting_on_each_other(
    make_store,
):
    # Replicas B and A take in m0, m1, m2, m3 of one conversation in turn, before any is answered.
    # Each sees older messages waiting at the other. Each waits for those older than itself only:
    # B's m0 must not wait for A's m1 (which waits for m0), or both would stand still for the
    # hold's limit (3 leases: here 90 s); nor may A's m1 go before m0 once m3 came.
    from bot.locks import ConversationLines

    settings = Settings(inbox_lease=30.0)
    replicas = []
    for _ in range(2):
        inbox, lines = Inbox(make_store(), settings), ConversationLines()
        inbox.keep_order(lines.hold)
        await inbox.open()
        inbox.start({"discord": lambda claim: pytest.fail(f"replayed: {claim}")})
        replicas.append((inbox, lines))
    (a, lines_a), (b, lines_b) = replicas
    taken = []
    for name, inbox, lines in (("m0", b, lines_b), ("m1", a, lines_a), ("m2", b, lines_b), ("m3", a, lines_a)):
        ticket = lines.take("discord:1")
        taken.append((name, inbox, ticket, await inbox.accept(entry(name))))
        await asyncio.sleep(0.01)
    answered: list[str] = []

    async def answer(name, inbox, ticket, claim):
        await ticket.turn()
        answered.append(name)
        await inbox.finish(claim)
        ticket.release()

    try:
        await asyncio.gather(*(answer(*each) for each in taken))
        assert answered == ["m0", "m1", "m2", "m3"]
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_a_dead_holders_messages_come_back_oldest_first_though_a_scan_saw_the_older_one_held(opened):
    # A scan that finds a message still being answered must leave it as old as it is. Redis's
    # XAUTOCLAIM, used before, restarted its wait: once its holder died, its newer message came
    # back a scan earlier and was answered first (the chaos soak, seed 1: 0...15, 17, 18, 19, 16).
    store, lease = await opened(), 1.0
    older, newer = entry("older"), entry("newer")
    await store.accept(older, "dead-process", lease)
    await asyncio.sleep(0.4)
    await store.accept(newer, "dead-process", lease)
    await asyncio.sleep(0.4)
    await store.renew([older.key, newer.key], "dead-process", lease)  # its last renewal: then it dies
    await asyncio.sleep(0.4)
    for orphan in await store.orphans(lease, 10):  # a live replica's scan: what it finds is still held
        assert await store.reclaim(orphan, "live-process", lease) == HELD
    await asyncio.sleep(0.8)  # the claims lapsed (1 s after the renewal); the scan was 0.8 s ago
    assert [orphan.text for orphan in await store.orphans(lease, 10)] == ["older", "newer"]


@pytest.mark.timeout(30)
async def test_a_replay_waits_for_an_older_message_another_replica_is_still_answering(make_store):
    # C is answering m0 (slowly); A took in m1 and died; B replays m1 once A's lease lapses.
    # B must hold m1 for as long as C answers m0, past the limit for older messages nobody
    # answers (3 leases), and answer it as soon as m0 is done.
    from bot.locks import ConversationLines

    settings = Settings(inbox_lease=1.0)
    answered: list[str] = []
    c, a, b = (Inbox(make_store(), settings) for _ in range(3))
    lines_b = ConversationLines()
    b.keep_order(lines_b.hold)
    replays: list[asyncio.Task] = []

    def replay(claim: Claim) -> None:
        ticket = lines_b.take(claim.entry.conversation, arrived=claim.entry.arrived)

        async def answer() -> None:
            with ticket:
                await ticket.turn()
                answered.append(claim.entry.text)
                await b.finish(claim)

        replays.append(asyncio.create_task(answer()))

    for inbox in (c, a, b):
        await inbox.open()
    try:
        m0 = await c.accept(entry("m0"))
        await asyncio.sleep(0.01)
        assert await a.accept(entry("m1")) is not None
        await a.close()  # A dies: its claim on m1 is no longer renewed
        b.start({"discord": replay})
        await asyncio.sleep(4 * settings.inbox_lease)
        assert replays and answered == []  # replayed, and held: m0 is still being answered at C
        answered.append("m0")
        await c.finish(m0)
        await asyncio.wait_for(asyncio.gather(*replays), 5)
        assert answered == ["m0", "m1"]
    finally:
        await asyncio.gather(c.close(), b.close())


@pytest.mark.timeout(300)
async def test_after_a_restart_a_new_message_is_answered_after_the_older_ones_of_its_conversation(bots):
    # Two messages in flight in a channel when the process is killed; the restarted process
    # (the same SQLite file) gets a third one as soon as it is up. Leases are long: the new
    # process must not wait for them to lapse, nor answer the third first.
    fake = bots.discord
    first = await bots.start("first", INBOX_LEASE="60s")
    fake.delay("POST", f"/channels/{CHANNEL_ID}/messages", HELD_FOR_GOOD)  # the first answer is on its way
    said = ["message one", "message two", "message three"]
    sent = [await fake.send_message(f"{MENTION} {said[0]}", mentions=(BOT_ID,))]
    await wait_for(lambda: fake.held == 1, timeout=60, what="the first answer on its way")
    sent.append(await fake.send_message(f"{MENTION} {said[1]}", mentions=(BOT_ID,)))
    typing = lambda: sum(1 for call in fake.calls if call.path.endswith("/typing"))  # noqa: E731
    await wait_for(lambda: typing() >= 2, timeout=60, what="the second message recorded (typing shows then)")
    _kill(first)

    second = await bots.start("second", INBOX_LEASE="60s")
    sent.append(await fake.send_message(f"{MENTION} {said[2]}", mentions=(BOT_ID,)))
    await wait_for(lambda: len(_discord_answers(fake)) >= 3, timeout=120, what="three answers")
    answered = [int(message["message_reference"]["message_id"]) for message in _discord_answers(fake)]
    assert answered == sent  # in the order they were written
    assert await _remembered(bots.memory_url, f"discord:{CHANNEL_ID}") == said
    assert _metric(second, "blenderchat_inbox_replayed_total", platform="discord") == 2


@pytest.mark.timeout(300)
async def test_a_new_message_to_the_surviving_replica_waits_for_the_dead_ones_older_messages(on_redis):
    # Two replicas on Redis; A is answering a Slack thread (its first answer on its way, the
    # second message waiting behind it) when it is killed. The thread's next message reaches B
    # at once: B answers A's two first, once their leases lapse, then the new one.
    bots = on_redis
    slack = bots.slack
    a = await bots.start("a", discord_too=False)
    b = await bots.start("b", discord_too=False)
    slack.delay("chat.postMessage", HELD_FOR_GOOD)
    thread = Conversation("slack", "C1")
    await thread.say(bots, a, "message one")
    await wait_for(lambda: slack.held == 1, timeout=60, what="A's first answer on its way")
    await thread.say(bots, a, "message two")  # acked: recorded
    _kill(a)
    await thread.say(bots, b, "message three")
    await wait_for(lambda: len(_slack_answers(slack)) >= 3, timeout=120, what="three answers")
    markers = [Entry(f"slack:T1:C1:{ts}", "slack", "", "", "").exchange_id for ts in thread.sent]
    assert [_marker(message) for message in _slack_answers(slack)] == markers  # in the order they came
    assert await _remembered(bots.memory_url, thread.name) == thread.said
    assert _metric(b, "blenderchat_inbox_replayed_total", platform="slack") == 2


# -- item 10: entries of a platform not run here, and forgotten conversations ------------


async def test_entries_of_a_platform_not_run_here_expire_by_age(opened):
    settings = Settings(inbox_lease=0.3, inbox_max_age=60.0)
    dead = Inbox(await opened(), settings)
    await dead.accept(entry("an hour old", platform="slack", arrived=time.time() - 3600))
    await dead.accept(entry("a second old", platform="slack"))
    await asyncio.sleep(0.5)
    live = Inbox(await opened(), settings)  # runs Discord only
    live._replayers = {"discord": lambda claim: None}
    assert await live.scan() == 0
    assert _sample(live.metrics, "blenderchat_inbox_expired_total", platform="slack") == 1
    assert await live.store.depth() == 1  # the fresh one waits for a process that runs Slack
    await asyncio.sleep(0.5)
    [left] = await live.store.orphans(0.3, 10)
    assert left.text == "a second old"


async def test_forgetting_a_conversation_removes_its_waiting_entries(opened):
    settings = Settings(inbox_lease=0.3)
    dead = Inbox(await opened(), settings)
    before = [entry(f"before {n}", conversation="discord:1") for n in range(2)]
    for message in before:
        await dead.accept(message)
    await dead.accept(entry("another conversation", conversation="discord:2"))
    live = Inbox(await opened(), settings)
    here = await live.accept(entry("the reset itself, answered here", conversation="discord:1"))
    forgotten_at = time.time()
    after = entry("after the reset", conversation="discord:1", arrived=forgotten_at + 1)
    await dead.accept(after)
    await live.forget("discord:1", forgotten_at)
    assert await live.store.depth() == 3  # the other conversation's, the one answered here, the later one
    await asyncio.sleep(0.5)
    assert sorted(orphan.text for orphan in await live.store.orphans(0.3, 10)) == [
        "after the reset", "another conversation", "the reset itself, answered here"]
    for message in before:  # nor is a retry of one answered
        assert await live.accept(message) is None
    await live.finish(here)


async def test_post_api_reset_removes_the_conversations_waiting_messages(make_settings, tmp_path):
    # A stopped process left two web messages of conversation "c" (and one of "d") unanswered;
    # their leases are still live when the conversation is forgotten through the API.
    from aiohttp.test_utils import TestClient, TestServer

    from bot.startup import open_engine
    from bot.web import build_app

    settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db", inbox_lease=60.0)
    dead = Inbox(SQLiteInbox(tmp_path / "memory.db"), settings)
    await dead.store.open()
    waiting = [entry(f"before {n}", conversation="web:c", platform="web") for n in range(2)]
    for message in [*waiting, entry("another conversation", conversation="web:d", platform="web")]:
        await dead.accept(message)
    engine, _ = await open_engine(settings)
    inbox = Inbox(SQLiteInbox(tmp_path / "memory.db"), settings, engine.metrics)
    inbox.attach(engine)  # as `blender-chat run` does
    await inbox.open()
    async with engine:
        client = TestClient(TestServer(build_app(engine, settings, inbox=inbox), host="127.0.0.1", port=0))
        await client.start_server()
        try:
            response = await client.post("/api/reset", json={"conversation": "c"})
            assert response.status == 200
            assert await inbox.store.depth() == 1  # only the other conversation's
            for message in waiting:
                assert await inbox.accept(message) is None  # not answered later either
        finally:
            await client.close()
            await inbox.close()
            await dead.store.close()


# -- the suspected ones ----------------------------------------------------------------


async def test_a_claim_whose_done_mark_failed_lapses_and_is_replayed(opened):
    # Marking a message done failed once (the store blinked): the claim must not be renewed
    # for as long as the process lives, or the entry is never replayed nor removed.
    store = await opened()
    settings = Settings(inbox_lease=0.3)
    inbox = Inbox(FailingOnce(store, "finish", nth=1), settings)
    claim = await inbox.accept(entry("answered, its done mark lost"))
    other = await inbox.accept(entry("still being answered"))
    await inbox.finish(claim)
    for _ in range(5):  # the renewal loop, every lease/3
        await inbox._renew()
        await asyncio.sleep(0.1)
    replayed: list[Claim] = []
    inbox._replayers = {"discord": replayed.append}
    await inbox.scan()
    assert [claim.entry.text for claim in replayed] == ["answered, its done mark lost"]
    assert replayed[0].replayed  # its delivery is checked first
    await inbox.finish(replayed[0])
    await inbox.finish(other)
    assert await store.depth() == 0


async def test_claims_accepted_before_the_inbox_starts_are_renewed(make_store, opened):
    # `blender-chat run` opens the inbox, then connects the platforms (up to a minute), and only
    # then starts the scans: messages accepted meanwhile must not look abandoned to other replicas.
    settings = Settings(inbox_lease=0.3)
    inbox = Inbox(make_store(), settings)
    await inbox.open()
    try:
        message = entry("accepted while Discord still connects")
        assert await inbox.accept(message) is not None
        await asyncio.sleep(0.8)  # past two leases, start() not called yet
        other = Inbox(await opened(), settings)
        assert await other.accept(message) is None  # held: not answered twice
        other._replayers = {"discord": lambda claim: pytest.fail(f"replayed: {claim}")}
        await other.scan()
    finally:
        await inbox.close()


async def test_an_answered_message_leaves_no_text_in_redis(tmp_path):
    # XDEL only flags a stream entry: its bytes stay until its whole node is deleted, which a
    # single message pending for long prevents. DUMP shows what Redis keeps (and saves); a
    # server of this test's own, so that it can be told to save uncompressed.
    server = PrivateRedis(tmp_path)
    server.start()
    store = RedisInbox(server.url, prefix=unique_prefix())
    await store.open()
    try:
        client = store._redis
        await client.config_set("rdbcompression", "no")
        _, pending = await store.accept(entry(f"still being answered {uuid.uuid4().hex}"), "process-a", 30.0)
        _, answered = await store.accept(entry(f"my card number is {uuid.uuid4().hex}"), "process-a", 30.0)
        await store.finish(answered, 60.0)
        kept = b"".join([await client.dump(key) or b"" async for key in client.scan_iter()])
        assert answered.text.encode() not in kept
        assert pending.text.encode() in kept  # (the check can see text)
    finally:
        await store.close()
        server.stop()


async def test_a_scan_of_an_inbox_that_never_recorded_anything_finds_nothing_and_no_fault(opened):
    inbox = Inbox(await opened(), Settings(inbox_lease=0.3))
    inbox._replayers = {"discord": lambda claim: pytest.fail(f"replayed: {claim}")}
    assert await inbox.scan() == 0
    assert inbox.failure is None
