"""Every memory backend passes the same suite (Redis on a key prefix of each
test); SQLite and Redis survive reopening; SQLite never stores half an exchange;
ratings of replies live and die with their conversation."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)

from bot.memory import ExchangeRef, Feedback, open_store

BACKENDS = ["memory", "sqlite", "redis"]


def store_url(backend: str, tmp_path: Path, redis_url: str, prefix: str) -> str:
    if backend == "redis":
        return f"{redis_url}?prefix={prefix}"
    return {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/memory.db"}[backend]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
async def make_store(backend, tmp_path, request):
    """Opens stores of `backend`; Redis ones on a key prefix of this test, deleted afterwards."""
    prefix = unique_prefix()
    url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    stores = []

    async def make(*, max_turns: int = 3, ttl: float = 0.0):
        store = open_store(store_url(backend, tmp_path, url, prefix), max_turns=max_turns, ttl=ttl)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    if backend == "redis":
        delete_prefix(url, prefix)


@pytest.fixture
async def store(make_store):
    return await make_store()


async def test_exchanges_come_back_in_order(store):
    await store.append_exchange("c1", "hello", " hi there")
    await store.append_exchange("c1", "how are you?", " fine")
    history = await store.history("c1")
    assert [(e.user, e.bot) for e in history] == [("hello", " hi there"), ("how are you?", " fine")]


async def test_conversations_are_separate(store):
    await store.append_exchange("a", "one", "1")
    await store.append_exchange("b", "two", "2")
    assert [e.user for e in await store.history("a")] == ["one"]
    assert [e.user for e in await store.history("b")] == ["two"]
    assert await store.history("unknown") == []


async def test_history_is_bounded_by_max_turns_dropping_the_oldest(store):
    for i in range(5):
        await store.append_exchange("c", f"m{i}", f"r{i}")
    assert [e.user for e in await store.history("c")] == ["m2", "m3", "m4"]


async def test_reset_forgets_one_conversation(store):
    await store.append_exchange("a", "one", "1")
    await store.append_exchange("b", "two", "2")
    assert await store.reset("a") is True
    assert await store.reset("a") is False
    assert await store.history("a") == []
    assert len(await store.history("b")) == 1


async def test_idle_conversations_are_forgotten_and_active_ones_kept(backend, make_store):
    """SQLite and the in-process store forget them in `sweep`; Redis expires the
    key `ttl` after the last exchange by itself, so its `sweep` finds nothing."""
    store = await make_store(ttl=0.6)
    await store.append_exchange("idle", "old", "old")
    await asyncio.sleep(0.8)
    await store.append_exchange("active", "new", "new")
    swept = await store.sweep(0.6)
    assert await store.history("idle") == []
    assert len(await store.history("active")) == 1
    assert swept == (0 if backend == "redis" else 1)


async def test_unicode_and_odd_text_round_trip(store):
    text = "שלום 🙂 ``` code ``` \x00-free <@123> @everyone " + "x" * 5000
    await store.append_exchange("c", text, " ok")
    assert (await store.history("c"))[0].user == text


async def test_concurrent_appends_lose_nothing(store):
    await asyncio.gather(*[store.append_exchange(f"c{i % 4}", f"m{i}", f"r{i}") for i in range(12)])
    for i in range(4):
        assert len(await store.history(f"c{i}")) == 3


@pytest.mark.parametrize("backend", ["sqlite", "redis"])  # memory:// is this process only, by design
async def test_history_survives_reopening_the_store(make_store):
    first = await make_store(max_turns=10)
    await first.append_exchange("c", "remember me", " I will")
    await first.close()
    second = await make_store(max_turns=10)
    assert [(e.user, e.bot) for e in await second.history("c")] == [("remember me", " I will")]


async def test_sqlite_failed_write_stores_no_part_of_the_exchange(tmp_path):
    """A failure in the middle of storing an exchange (here the conversation
    row, written after the exchange row) rolls the whole exchange back."""
    path = tmp_path / "memory.db"
    store = open_store(f"sqlite:///{path}", max_turns=10)
    await store.open()
    await store.append_exchange("c", "first", " kept")
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER fail_midway BEFORE UPDATE ON conversations "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
    with pytest.raises(sqlite3.DatabaseError):
        await store.append_exchange("c", "second", " lost")
    assert [e.user for e in await store.history("c")] == ["first"]
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT user_text FROM exchanges").fetchall() == [("first",)]


# -- feedback on replies -------------------------------------------------------


def rating(exchange, rating: str = "good", *, user: str = "U1", platform: str = "slack", at: float | None = None):
    return Feedback(ExchangeRef(exchange[0], exchange[1].id), rating, user, platform, at or time.time())


async def test_append_returns_the_stored_exchange(store):
    stored = await store.append_exchange("c", "hello", " hi")
    assert stored.id and (await store.history("c")) == [stored]
    # Appended again with its id: nothing new is stored, and the exchange stored first is returned.
    assert await store.append_exchange("c", "hello", " a different reply", exchange_id=stored.id) == stored
    assert (await store.history("c")) == [stored]


async def test_feedback_is_recorded_against_its_exchange_and_replaced_by_the_same_user(store):
    first = await store.append_exchange("c", "hello", " hi")
    second = await store.append_exchange("c", "and you?", " fine")
    assert await store.add_feedback(rating(("c", first), "good", user="U1"))
    assert await store.add_feedback(rating(("c", second), "bad", user="U1"))
    assert await store.add_feedback(rating(("c", second), "good", user="U2"))
    assert await store.add_feedback(rating(("c", second), "good", user="U1"))  # changed their mind
    rows = await store.list_feedback()
    assert sorted((row.exchange.id, row.user, row.rating) for row in rows) == sorted(
        [(first.id, "U1", "good"), (second.id, "U2", "good"), (second.id, "U1", "good")]
    )
    assert all(row.exchange.conversation == "c" for row in rows)


async def test_feedback_on_an_exchange_that_is_not_stored_is_refused(store):
    kept = await store.append_exchange("c", "hello", " hi")
    assert not await store.add_feedback(rating(("c", replace(kept, id="no-such-exchange"))))
    assert not await store.add_feedback(rating(("c", replace(kept, id=""))))  # no id at all
    assert not await store.add_feedback(rating(("other", kept)))  # no such conversation
    assert await store.list_feedback() == []


async def test_feedback_is_listed_newest_first_by_window_platform_and_limit(store):
    exchange = await store.append_exchange("c", "hello", " hi")
    now = time.time()
    for index, platform in enumerate(["web", "slack", "web", "discord"]):
        await store.add_feedback(rating(("c", exchange), user=f"U{index}", platform=platform, at=now - 100 + index))
    assert [row.user for row in await store.list_feedback()] == ["U3", "U2", "U1", "U0"]
    assert [row.user for row in await store.list_feedback(since=now - 98.5)] == ["U3", "U2"]
    assert [row.user for row in await store.list_feedback(platform="web")] == ["U2", "U0"]
    assert [row.user for row in await store.list_feedback(platform="web", limit=1)] == ["U2"]


async def test_reset_deletes_the_conversations_feedback_only(store):
    mine = await store.append_exchange("mine", "hello", " hi")
    theirs = await store.append_exchange("theirs", "hello", " hi")
    await store.add_feedback(rating(("mine", mine)))
    await store.add_feedback(rating(("theirs", theirs)))
    assert await store.reset("mine")
    assert [row.exchange.conversation for row in await store.list_feedback()] == ["theirs"]
    # The same conversation started again has no ratings from before.
    await store.append_exchange("mine", "hello again", " hi")
    assert [row.exchange.conversation for row in await store.list_feedback()] == ["theirs"]


async def test_idle_sweep_and_expiry_delete_feedback_with_the_conversation(backend, make_store):
    store = await make_store(ttl=0.6)
    idle = await store.append_exchange("idle", "old", "old")
    assert await store.add_feedback(rating(("idle", idle), "bad"))
    await asyncio.sleep(0.8)
    active = await store.append_exchange("active", "new", "new")
    assert await store.add_feedback(rating(("active", active), "good"))
    await store.sweep(0.6)
    assert [(row.exchange.conversation, row.rating) for row in await store.list_feedback()] == [("active", "good")]


@pytest.mark.parametrize("backend", ["redis"])
async def test_redis_feedback_expires_when_its_conversation_does(make_store):
    """A rating given long after the last exchange still goes when the conversation goes."""
    store = await make_store(ttl=1.0)
    exchange = await store.append_exchange("c", "hello", " hi")
    await asyncio.sleep(0.5)
    assert await store.add_feedback(rating(("c", exchange)))
    conversation_ttl = await store._redis.pttl(store._key("c"))
    feedback_ttl = await store._redis.pttl(store._feedback_key("c"))
    assert 0 < feedback_ttl <= conversation_ttl + 5
    await store.append_exchange("c", "still here", " yes")  # a new exchange keeps both alive
    assert await store._redis.pttl(store._feedback_key("c")) > conversation_ttl


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_feedback_survives_reopening_the_store(make_store):
    first = await make_store(max_turns=10)
    exchange = await first.append_exchange("c", "remember me", " I will")
    await first.add_feedback(rating(("c", exchange), "bad", user="U7", platform="web"))
    await first.close()
    second = await make_store(max_turns=10)
    [row] = await second.list_feedback()
    assert (row.exchange, row.rating, row.user, row.platform) == (ExchangeRef("c", exchange.id), "bad", "U7", "web")


# -- exchange ids, and writes that fail half-way (issue 12, items 7 and 8) ----------------


async def test_an_exchange_appended_twice_with_its_id_is_stored_once(store):
    """A retried or replayed append (a resent command, a message answered again after a crash) is a no-op."""
    await store.append_exchange("c", "hello", " hi", exchange_id="ex-1")
    await store.append_exchange("c", "hello", " hi", exchange_id="ex-1")
    await store.append_exchange("c", "again", " yes", exchange_id="ex-2")
    await store.append_exchange("c", "third", " no id given")
    history = await store.history("c")
    assert [(e.user, e.id) for e in history[:2]] == [("hello", "ex-1"), ("again", "ex-2")]
    assert history[2].user == "third" and history[2].id and history[2].id not in ("ex-1", "ex-2")
    await store.append_exchange("c", "hello", " hi", exchange_id="ex-1")
    assert len(await store.history("c")) == 3


async def test_sqlite_a_commit_that_fails_does_not_wedge_later_writes(tmp_path):
    """COMMIT itself fails (here a deferred foreign key, as a full disk would):
    the transaction is rolled back, and the next exchange is stored."""
    path = tmp_path / "memory.db"
    store = open_store(f"sqlite:///{path}", max_turns=10)
    await store.open()
    await store.append_exchange("c", "first", " kept")
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE audit_parent (id INTEGER PRIMARY KEY);
            CREATE TABLE audit (parent INTEGER REFERENCES audit_parent (id) DEFERRABLE INITIALLY DEFERRED);
            CREATE TRIGGER audit_exchange AFTER INSERT ON exchanges WHEN NEW.user_text = 'fails at commit'
            BEGIN INSERT INTO audit VALUES (42); END;
        """)
    with pytest.raises(sqlite3.IntegrityError):
        await store.append_exchange("c", "fails at commit", " lost")
    await store.append_exchange("c", "second", " kept too")
    await store.reset("other")  # every kind of write works again
    assert [e.user for e in await store.history("c")] == ["first", "second"]
    await store.close()


async def test_sqlite_a_write_cancelled_while_waiting_to_begin_leaves_no_transaction_open(tmp_path):
    """Cancelled during BEGIN (the database was locked by another writer): the BEGIN
    still runs on the connection's thread once the lock is free, and is undone."""
    path = tmp_path / "memory.db"
    store = open_store(f"sqlite:///{path}", max_turns=10)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database
    write = asyncio.create_task(store.append_exchange("c", "cancelled", " lost"))
    await asyncio.sleep(0.3)  # waiting for the lock in BEGIN IMMEDIATE
    write.cancel()  # e.g. the reply's task was cancelled at shutdown
    other.execute("COMMIT")
    other.close()
    with pytest.raises(asyncio.CancelledError):
        await write
    await store.append_exchange("c", "after", " kept")
    assert [e.user for e in await store.history("c")] == ["after"]
    await store.close()


async def test_sqlite_a_database_from_before_exchange_ids_gets_them(tmp_path):
    path = tmp_path / "memory.db"
    with sqlite3.connect(path) as db:  # the first release's schema
        db.executescript("""
            CREATE TABLE exchanges (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation TEXT NOT NULL,
                                    user_text TEXT NOT NULL, bot_text TEXT NOT NULL, created_at REAL NOT NULL);
            CREATE TABLE conversations (id TEXT PRIMARY KEY, updated_at REAL NOT NULL);
            INSERT INTO exchanges (conversation, user_text, bot_text, created_at) VALUES ('c', 'old', ' one', 1.0);
        """)
    store = open_store(f"sqlite:///{path}", max_turns=10)
    await store.open()
    await store.append_exchange("c", "new", " two", exchange_id="ex-new")
    await store.append_exchange("c", "new", " two", exchange_id="ex-new")
    assert [(e.user, e.id) for e in await store.history("c")] == [("old", "row-1"), ("new", "ex-new")]
    await store.close()


@pytest.mark.parametrize("backend", ["redis"])
async def test_redis_exchanges_from_before_exchange_ids_are_still_read(make_store):
    store = await make_store()
    await store._redis.rpush(store._key("c"), '{"user": "old", "bot": " one", "at": 1.5}')
    [old] = await store.history("c")
    assert (old.user, old.id) == ("old", "")
    assert not await store.add_feedback(rating(("c", old)))  # no id to name it by
    new = await store.append_exchange("c", "new", " two")
    assert await store.add_feedback(rating(("c", new), user="U2"))
    assert len(await store.list_feedback()) == 1
