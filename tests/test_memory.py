"""Every memory backend passes the same suite; SQLite also survives restarts
and never stores half an exchange."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.memory import open_store

BACKENDS = ["memory", "sqlite"]


def store_url(backend: str, tmp_path: Path) -> str:
    return {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/memory.db"}[backend]


@pytest.fixture(params=BACKENDS)
async def store(request, tmp_path):
    store = open_store(store_url(request.param, tmp_path), max_turns=3)
    await store.open()
    yield store
    await store.close()


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


async def test_sweep_deletes_idle_conversations_and_keeps_active_ones(store):
    await store.append_exchange("idle", "old", "old")
    await asyncio.sleep(0.3)
    await store.append_exchange("active", "new", "new")
    assert await store.sweep(0.2) == 1
    assert await store.history("idle") == []
    assert len(await store.history("active")) == 1


async def test_unicode_and_odd_text_round_trip(store):
    text = "שלום 🙂 ``` code ``` \x00-free <@123> @everyone " + "x" * 5000
    await store.append_exchange("c", text, " ok")
    assert (await store.history("c"))[0].user == text


async def test_concurrent_appends_lose_nothing(store):
    await asyncio.gather(*[store.append_exchange(f"c{i % 4}", f"m{i}", f"r{i}") for i in range(12)])
    for i in range(4):
        assert len(await store.history(f"c{i}")) == 3


async def test_sqlite_history_survives_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path}/db/memory.db"
    first = open_store(url, max_turns=10)
    await first.open()
    await first.append_exchange("c", "remember me", " I will")
    await first.close()

    second = open_store(url, max_turns=10)
    await second.open()
    assert [(e.user, e.bot) for e in await second.history("c")] == [("remember me", " I will")]
    await second.close()


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
