"""Every memory backend passes the same suite (Redis on a key prefix of each
test); SQLite and Redis survive reopening; SQLite never stores half an exchange."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)

from bot.memory import open_store

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
