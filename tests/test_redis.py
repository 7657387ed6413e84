"""Shared state in Redis: several replicas continue each other's conversations,
accept an event once, never interleave the turns of a conversation, and keep
answering through a Redis outage."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from model_doubles import GatedModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_servers import PrivateRedis, delete_prefix, redis_url, shared_prefix, unique_prefix  # noqa: F401 (fixtures)
from tcp_proxy import TcpProxy

from bot.config import Settings
from bot.engine import ReplyEngine
from bot.errors import RateLimited, UserBlocked
from bot.locks import RedisLocks
from bot.memory import StoreUnavailable, open_store
from bot.memory.redis import RedisStore
from bot.metrics import Metrics
from bot.shared import (
    DEFAULT_PREFIX,
    RedisDedupeStore,
    RedisRateLimiter,
    SharedState,
    connect,
    shared_redis_url,
    split_prefix,
)


class Replica:
    """`tests/replica.py` in a subprocess: requests go in as JSON lines, answers
    come back as futures."""

    def __init__(self, model_dir: Path, url: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "replica.py"), str(model_dir), url, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env(LOG_LEVEL="WARNING"),
        )  # fmt: skip
        self._ids = itertools.count()
        self._waiting: dict[int, Future[dict]] = {}
        self._ready: Future[dict] = Future()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "ready" in message:
                self._ready.set_result(message)
            else:
                with self._lock:
                    future = self._waiting.pop(message["id"])
                future.set_result(message)
        error = RuntimeError(f"replica exited with {self.process.wait()}")
        with self._lock:
            pending = [self._ready, *self._waiting.values()]
        for future in pending:
            if not future.done():
                future.set_exception(error)

    def wait_ready(self, timeout: float = 90) -> None:
        self._ready.result(timeout)

    def send(self, op: str, **fields) -> Future[dict]:
        request_id = next(self._ids)
        future: Future[dict] = Future()
        with self._lock:
            self._waiting[request_id] = future
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"id": request_id, "op": op, **fields}) + "\n")
            self.process.stdin.flush()
        return future

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def result(future: Future[dict], timeout: float = 60) -> dict:
    return await asyncio.wait_for(asyncio.wrap_future(future), timeout)


@pytest.fixture(scope="module")
def replicas(blenderbot_dir, redis_url, shared_prefix):
    """Two replicas on one Redis; each generation takes 0.15 s longer than the
    tiny model needs, so that messages sent to both really overlap."""
    url = f"{redis_url}?prefix={shared_prefix}"
    pair = [Replica(blenderbot_dir, url, "--delay", "0.15") for _ in range(2)]
    try:
        for replica in pair:
            replica.wait_ready()
        yield pair
    finally:
        for replica in pair:
            replica.close()


@pytest.fixture
async def prefix(redis_url):
    prefix = unique_prefix()
    yield prefix
    delete_prefix(redis_url, prefix)


async def stored(redis_url: str, prefix: str, conversation: str) -> list[tuple[str, str]]:
    store = RedisStore(redis_url, max_turns=50, prefix=prefix)
    await store.open()
    try:
        return [(e.user, e.bot) for e in await store.history(conversation)]
    finally:
        await store.close()


def flat(exchanges: list[tuple[str, str]]) -> list[str]:
    return [turn for exchange in exchanges for turn in exchange]


# -- several replicas ------------------------------------------------------


async def test_a_conversation_started_on_one_replica_continues_on_the_other(replicas, redis_url, shared_prefix):
    a, b = replicas
    first = await result(a.send("reply", conversation="handover", text="Hello from replica A"))
    assert first["answer"].strip() and first["seen"] == ["Hello from replica A"]

    second = await result(b.send("reply", conversation="handover", text="And now on replica B"))
    history = await stored(redis_url, shared_prefix, "handover")
    assert second["seen"] == flat(history[:1]) + ["And now on replica B"]
    assert second["answer"].strip()

    third = await result(a.send("reply", conversation="handover", text="Back on A"))
    history = await stored(redis_url, shared_prefix, "handover")
    assert [user for user, _ in history] == ["Hello from replica A", "And now on replica B", "Back on A"]
    assert third["seen"] == flat(history[:2]) + ["Back on A"]


async def test_the_same_event_offered_to_both_replicas_is_accepted_once(replicas):
    a, b = replicas
    keys = [f"slack-event:Ev{i:04d}:{unique_prefix()}" for i in range(20)]
    offers = [(a.send("dedupe", key=key, ttl=60), b.send("dedupe", key=key, ttl=60)) for key in keys]
    for offer_a, offer_b in offers:
        firsts = [(await result(offer_a))["first"], (await result(offer_b))["first"]]
        assert sorted(firsts) == [False, True]
    # Offered again later, within the TTL, it is still a repeat everywhere.
    again = [(await result(replica.send("dedupe", key=keys[0], ttl=60)))["first"] for replica in replicas]
    assert again == [False, False]


async def test_the_dedupe_key_is_accepted_again_once_it_expired(replicas):
    a, b = replicas
    key = f"slack-event:{unique_prefix()}"
    assert (await result(a.send("dedupe", key=key, ttl=1.5)))["first"] is True
    assert (await result(b.send("dedupe", key=key, ttl=1.5)))["first"] is False
    await asyncio.sleep(2.0)
    assert (await result(b.send("dedupe", key=key, ttl=1.5)))["first"] is True


async def test_concurrent_messages_of_one_conversation_on_both_replicas_never_interleave(
    replicas, redis_url, shared_prefix
):
    a, b = replicas
    sent = {"A": [], "B": []}
    futures = []
    for i in range(4):
        for name, replica in (("A", a), ("B", b)):
            text = f"message {i} to {name}"
            sent[name].append(text)
            futures.append(replica.send("reply", conversation="busy", text=text))
    results = [await result(future) for future in futures]
    assert all(r["answer"].strip() for r in results)

    history = await stored(redis_url, shared_prefix, "busy")
    users = [user for user, _ in history]
    assert sorted(users) == sorted(sent["A"] + sent["B"])  # every message stored once
    # Each replica answers its own messages in arrival order...
    for name in sent:
        assert [user for user in users if user.endswith(name)] == sent[name]
    # ...and every answer was generated from all the exchanges stored before it: no
    # two replicas read the conversation at the same time.
    seen = {r["seen"][-1]: r["seen"] for r in results}
    for k, (user, _) in enumerate(history):
        assert seen[user] == flat(history[:k]) + [user]


# -- locks -------------------------------------------------------------------


@pytest.fixture
async def client(redis_url):
    client = connect(redis_url)
    yield client
    await client.aclose()


async def test_a_redis_lock_keeps_the_other_replica_waiting_until_released(client, prefix):
    mine, theirs = RedisLocks(client, prefix=prefix), RedisLocks(client, prefix=prefix)
    held = mine.lock("c")
    await held.acquire()
    waiting = asyncio.create_task(theirs.lock("c").acquire())
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await held.release()
    await asyncio.wait_for(waiting, 5)
    assert await client.exists(f"{prefix}lock:c") == 1


async def test_a_held_lock_is_renewed_past_its_lease(client, prefix):
    locks = RedisLocks(client, prefix=prefix, lease=1.0)
    held = locks.lock("c")
    await held.acquire()
    # Without renewal it would expire after 1 s; 2.5 leases later it is still ours.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(locks.lock("c").acquire(), 2.5)
    await held.release()
    assert await client.exists(f"{prefix}lock:c") == 0


async def test_a_wait_cut_short_leaves_no_lock_behind(client, prefix):
    locks = RedisLocks(client, prefix=prefix)
    held = locks.lock("c")
    await held.acquire()
    for _ in range(5):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(locks.lock("c").acquire(), 0.1)
    await held.release()
    assert await client.exists(f"{prefix}lock:c") == 0
    late = locks.lock("c")
    await asyncio.wait_for(late.acquire(), 2)  # nobody else's token stayed behind
    await late.release()


async def test_the_engine_asks_redis_only_on_its_turn_and_forgets_idle_conversations(
    tiny_model, make_settings, client, prefix
):
    """This process's line first, then the shared lock: a message waiting behind
    another of its conversation holds no Redis lock, and nothing stays behind."""
    model = GatedModel(tiny_model)
    engine = ReplyEngine(model, open_store("memory://", max_turns=5), make_settings(),
                         shared_lock=RedisLocks(client, prefix=prefix))  # fmt: skip
    async with engine:
        model.gate.clear()
        first = asyncio.create_task(engine.reply("c", "first"))
        await asyncio.to_thread(model.wait_for_calls, 1)
        second = asyncio.create_task(engine.reply("c", "second"))
        await asyncio.sleep(0.2)
        assert engine._lines.waiting("c") == 2 and len(await client.keys(f"{prefix}lock:*")) == 1
        model.gate.set()
        assert all(await asyncio.gather(first, second))
        assert len(engine._lines) == 0 and await client.exists(f"{prefix}lock:c") == 0
    assert [turns[-1] for batch in model.batches for turns in batch] == ["first", "second"]


# -- rate limits ---------------------------------------------------------------


async def test_a_users_rate_limit_is_shared_by_the_replicas(client, prefix):
    """Two limiters on one Redis stand for two replicas: together they let
    `burst` messages through, then one notice, then silence."""
    replicas = [RedisRateLimiter(client, burst=3, per_minute=1, prefix=prefix) for _ in range(2)]
    for i in range(3):
        await replicas[i % 2].acquire("U1")
    with pytest.raises(RateLimited) as first:
        await replicas[1].acquire("U1")
    assert first.value.notify is True and 50 < first.value.retry_after <= 60
    with pytest.raises(RateLimited) as second:
        await replicas[0].acquire("U1")
    assert second.value.notify is False
    await replicas[0].acquire("U2")  # another user has a bucket of their own


async def test_a_rate_limited_user_gets_a_token_back_with_time(client, prefix):
    limiter = RedisRateLimiter(client, burst=1, per_minute=60, prefix=prefix)  # a token a second
    await limiter.acquire("U1")
    with pytest.raises(RateLimited):
        await limiter.acquire("U1")
    await asyncio.sleep(1.2)
    await limiter.acquire("U1")
    assert 0 < await client.pttl(f"{prefix}bucket:U1") <= 2000  # the bucket goes once it would be full


async def test_blocked_users_and_a_limit_of_zero(client, prefix):
    blocking = RedisRateLimiter(client, burst=5, per_minute=10, blocked=frozenset({"U9"}), prefix=prefix)
    with pytest.raises(UserBlocked):
        await blocking.acquire("U9")
    unlimited = RedisRateLimiter(client, burst=1, per_minute=0, prefix=prefix)
    for _ in range(5):
        await unlimited.acquire("U1")


async def test_rate_limits_let_messages_through_while_redis_is_down(private_redis):
    client = connect(private_redis.url)
    metrics = Metrics()
    limiter = RedisRateLimiter(client, burst=1, per_minute=1, prefix="t:", metrics=metrics)
    await limiter.acquire("U1")
    private_redis.stop()
    await limiter.acquire("U1")  # over the limit, but Redis cannot say so
    assert 'blenderchat_errors_total{kind="rate_limit"} 1.0' in metrics.render().decode()
    private_redis.start()
    await limiter.acquire("U1")  # a fresh server, a fresh bucket
    with pytest.raises(RateLimited):
        await limiter.acquire("U1")
    await client.aclose()


# -- the store and the client --------------------------------------------------


async def test_redis_store_sets_the_ttl_and_keeps_conversations_forever_with_ttl_zero(redis_url, prefix, client):
    expiring = RedisStore(redis_url, max_turns=5, ttl=3600, prefix=prefix)
    forever = RedisStore(f"{redis_url}?prefix={prefix}forever:", max_turns=5, ttl=0)
    for store in (expiring, forever):
        await store.open()
        await store.append_exchange("c", "hi", " hello")
    assert 3_500_000 < await client.pttl(f"{prefix}conv:c") <= 3_600_000
    assert await client.pttl(f"{prefix}forever:conv:c") == -1
    for store in (expiring, forever):
        await store.close()


async def test_stores_on_different_prefixes_do_not_see_each_other(redis_url, prefix):
    one = open_store(f"{redis_url}?prefix={prefix}one:", max_turns=5)
    two = open_store(f"{redis_url}?prefix={prefix}two:", max_turns=5)
    await one.open()
    await two.open()
    await one.append_exchange("c", "only in one", " ok")
    assert await two.history("c") == []
    assert await two.reset("c") is False
    await one.close()
    await two.close()


async def test_a_malformed_element_is_skipped_not_fatal(redis_url, prefix, client):
    store = RedisStore(redis_url, max_turns=5, prefix=prefix)
    await store.open()
    await store.append_exchange("c", "first", " one")
    await client.rpush(f"{prefix}conv:c", b"not json")
    await store.append_exchange("c", "second", " two")
    assert [e.user for e in await store.history("c")] == ["first", "second"]
    await store.close()


def test_prefix_option_is_taken_out_of_the_url():
    assert split_prefix("redis://h:6379/2?prefix=bot1:&health_check_interval=5") == (
        "redis://h:6379/2?health_check_interval=5",
        "bot1:",
    )
    assert split_prefix("redis://h:6379/0") == ("redis://h:6379/0", DEFAULT_PREFIX)


def test_shared_state_uses_redis_url_or_a_redis_memory_url():
    assert shared_redis_url(Settings(memory_url="sqlite:///x.db")) is None
    assert shared_redis_url(Settings(memory_url="redis://m:6379/1")) == "redis://m:6379/1"
    assert shared_redis_url(Settings(memory_url="redis://m:6379/1", redis_url="redis://r:6379/0")) == "redis://r:6379/0"
    assert shared_redis_url(Settings(memory_url="memory://", redis_url="redis://r:6379/0")) == "redis://r:6379/0"
    assert SharedState.from_settings(Settings(memory_url="memory://")) is None


async def test_shared_state_from_settings_dedupes_and_pings(redis_url, prefix):
    shared = SharedState.from_settings(Settings(memory_url="memory://", redis_url=f"{redis_url}?prefix={prefix}"))
    assert shared is not None and shared.prefix == prefix
    await shared.ping()
    assert await shared.dedupe.first_time("Ev1", 60) is True
    assert await shared.dedupe.first_time("Ev1", 60) is False
    await shared.limiter.acquire("U1")
    assert await shared.client.exists(f"{prefix}bucket:U1") == 1
    await shared.close()


# -- a Redis outage --------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_the_bot_keeps_answering_through_a_redis_outage_and_recovers(tiny_model, make_settings, private_redis):
    settings = make_settings(memory_url=private_redis.url, reply_timeout=30)
    store = open_store(settings.memory_url, max_turns=10, ttl=600)
    metrics = Metrics()
    shared = SharedState.from_settings(settings, metrics=metrics)
    assert shared is not None
    engine = ReplyEngine(GatedModel(tiny_model), store, settings, metrics=metrics, shared_lock=shared.locks)
    async with engine:
        assert await engine.reply("c", "before the outage")
        await store.ping()

        private_redis.stop()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await shared.ping()
        # The user still gets answers: without memory, and none of them is stored.
        assert await asyncio.wait_for(engine.reply("c", "during the outage"), 20)
        assert await asyncio.wait_for(engine.reply("c", "still down"), 20)
        counted = metrics.render().decode()
        assert 'blenderchat_errors_total{kind="memory_write"} 2.0' in counted
        assert 'blenderchat_errors_total{kind="memory_read"} 2.0' in counted
        assert 'blenderchat_errors_total{kind="shared_lock"} 2.0' in counted  # answered without the lock

        private_redis.start()  # same port, empty (no persistence in the test server)
        await store.ping()
        await shared.ping()
        assert await engine.reply("c", "after the outage")
        assert [e.user for e in await store.history("c")] == ["after the outage"]
        assert await engine.reply("c", "and on")
        assert [e.user for e in await store.history("c")] == ["after the outage", "and on"]
    await shared.close()


async def test_dedupe_lets_events_through_while_redis_is_down(private_redis):
    client = connect(private_redis.url)
    dedupe = RedisDedupeStore(client, prefix="t:")
    assert await dedupe.first_time("Ev1", 60) is True
    private_redis.stop()
    assert await dedupe.first_time("Ev1", 60) is True  # a repeat answered twice beats a message lost
    private_redis.start()
    assert await dedupe.first_time("Ev2", 60) is True
    assert await dedupe.first_time("Ev2", 60) is False
    await client.aclose()


async def test_a_store_opened_while_redis_is_down_works_once_it_is_up(tmp_path):
    server = PrivateRedis(tmp_path)
    store = open_store(server.url, max_turns=5)
    await store.open()  # does not raise: the bot starts and reports not ready
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.append_exchange("c", "lost", " lost")
    server.start()
    try:
        await store.ping()
        await store.append_exchange("c", "kept", " kept")
        assert [e.user for e in await store.history("c")] == ["kept"]
    finally:
        await store.close()
        server.stop()


async def test_an_append_resent_after_its_answer_was_lost_is_stored_once(redis_url, prefix):
    """The connection drops after Redis ran the append but before its answer came
    back; redis-py resends it on a new connection. The exchange is stored once."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    store = RedisStore(proxy.url(), max_turns=10, prefix=prefix)
    await store.open()
    try:
        await store.append_exchange("c", "first", " one")
        proxy.drop_next_reply(b"second")  # the command carrying the exchange's text
        await store.append_exchange("c", "second", " two")
        assert proxy.count(b"second") == 2  # sent, lost, sent again
        assert [e.user for e in await store.history("c")] == ["first", "second"]
    finally:
        await store.close()
        await proxy.close()


async def test_a_cut_network_fails_commands_until_restored_and_a_restarted_append_only_redis_keeps_its_data(tmp_path):
    """The two outages the chaos soak (tests/soak.py) makes: the network to Redis cut (open
    connections reset, new ones refused) and Redis restarted with its append-only file."""
    server = PrivateRedis(tmp_path, appendonly=True)
    server.start()
    proxy = await TcpProxy("127.0.0.1", server.port).start()
    client = connect(proxy.url(), timeout=2)  # the bot's own client: it retries a dropped connection
    try:
        await client.set("kept", "yes")
        proxy.cut()
        with pytest.raises(RedisConnectionError):  # past its retries
            await client.get("kept")
        proxy.restore()
        assert await client.get("kept") == b"yes"
        server.stop()  # SIGTERM: Redis completes its append-only file
        server.start()  # on the same port
        assert await client.get("kept") == b"yes"  # a new connection, through the proxy, to the new process
    finally:
        await client.aclose()
        await proxy.close()
        server.stop()
