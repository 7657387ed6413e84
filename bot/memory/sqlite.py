"""`sqlite:///path.db`: history in one SQLite file that survives restarts.

One row per exchange, so a user message is never stored without its reply;
the insert, the conversation's timestamp and the trimming to `max_turns` are
one transaction; "try again" rewrites an exchange's row in place. Ratings of
replies sit in `feedback`, keyed by the exchange's id, deleted in the same
transaction as their conversation. Channel settings sit in `channel_settings`,
a row per channel and setting. A transaction that fails anywhere, BEGIN and
COMMIT included, or is cancelled, is rolled back, so one failed write (a full
disk) never leaves the connection inside a transaction that every later write
would trip over.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import aiosqlite

from bot.memory.base import FORGET_KEPT, Exchange, ExchangeRef, Feedback, StoreUnavailable, new_exchange_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL,
    user_text TEXT NOT NULL,
    bot_text TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS exchanges_by_conversation ON exchanges (conversation, id);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    updated_at REAL NOT NULL
);
"""
# Added after the first release: databases created before get the column on open,
# and their rows an id from their row number.
EXCHANGE_IDS = """
ALTER TABLE exchanges ADD COLUMN exchange_id TEXT;
"""
EXCHANGE_IDS_OF_OLD_ROWS = "UPDATE exchanges SET exchange_id = 'row-' || id WHERE exchange_id IS NULL"
EXCHANGE_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS exchanges_by_exchange_id ON exchanges (exchange_id)"
FEEDBACK = """
CREATE TABLE IF NOT EXISTS feedback (
    conversation TEXT NOT NULL,
    exchange_id TEXT NOT NULL,
    user TEXT NOT NULL,
    platform TEXT NOT NULL,
    rating TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (conversation, exchange_id, user)
);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (created_at);
CREATE TABLE IF NOT EXISTS forgotten (
    conversation TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""
# Each channel's settings (bot/memory/__init__.py, ChannelSettings): one row per setting.
CHANNEL_SETTINGS = """
CREATE TABLE IF NOT EXISTS channel_settings (
    channel TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (channel, name)
);
"""


class SQLiteStore:
    def __init__(self, path: str | Path, *, max_turns: int) -> None:
        self.path = Path(path).expanduser()
        self._max_turns = max_turns
        self._db: aiosqlite.Connection | None = None
        # One connection: its statements must not interleave across transactions.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        db = await connect(self.path)
        try:
            # Off by default in SQLite: tables referring to exchanges or conversations get their constraints kept.
            await db.execute("PRAGMA foreign_keys=ON")
            await db.executescript(SCHEMA)
            if "exchange_id" not in await _columns(db, "exchanges"):
                await db.executescript(EXCHANGE_IDS)
            await db.execute(EXCHANGE_IDS_OF_OLD_ROWS)
            await db.execute(EXCHANGE_ID_INDEX)
            await db.executescript(FEEDBACK)
            await db.executescript(CHANNEL_SETTINGS)
        except BaseException:
            await db.close()  # its thread would otherwise keep the process from exiting
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("the SQLite store is not open")
        return self._db

    def _transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        return transaction(self._conn, self._lock)

    async def ping(self) -> None:
        async with self._lock:
            await self._conn.execute("SELECT 1")

    async def history(self, conversation: str) -> list[Exchange]:
        async with self._lock, self._conn.execute(
            "SELECT user_text, bot_text, created_at, exchange_id FROM exchanges WHERE conversation = ? ORDER BY id",
            (conversation,),
        ) as cursor:
            return [Exchange(*row) for row in await cursor.fetchall()]

    async def append_exchange(
        self, conversation: str, user_text: str, bot_text: str, *, exchange_id: str | None = None,
        asked_at: float | None = None,
    ) -> Exchange | None:
        now = time.time()
        exchange_id = exchange_id or new_exchange_id()
        async with self._transaction() as db:
            if asked_at is not None:
                forgotten = await db.execute_fetchall(
                    "SELECT 1 FROM forgotten WHERE conversation = ? AND at > ?", (conversation, asked_at)
                )
                if list(forgotten):
                    return None
            cursor = await db.execute(
                "INSERT INTO exchanges (conversation, user_text, bot_text, created_at, exchange_id) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (exchange_id) DO NOTHING",
                (conversation, user_text, bot_text, now, exchange_id),
            )
            if cursor.rowcount == 0:  # stored already: a repeated append is a no-op
                rows = await db.execute_fetchall(
                    "SELECT user_text, bot_text, created_at, exchange_id FROM exchanges WHERE exchange_id = ?",
                    (exchange_id,),
                )
                return Exchange(*next(iter(rows)))
            await db.execute(
                "INSERT INTO conversations (id, updated_at) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at",
                (conversation, now),
            )
            await db.execute(
                "DELETE FROM exchanges WHERE conversation = ? AND id NOT IN "
                "(SELECT id FROM exchanges WHERE conversation = ? ORDER BY id DESC LIMIT ?)",
                (conversation, conversation, self._max_turns),
            )
        return Exchange(user_text, bot_text, now, exchange_id)

    async def replace_exchange(
        self, conversation: str, exchange_id: str, bot_text: str, *, new_id: str
    ) -> Exchange | None:
        now = time.time()
        select = "SELECT id, user_text FROM exchanges WHERE conversation = ? AND exchange_id = ?"
        async with self._transaction() as db:
            rows = list(await db.execute_fetchall(select, (conversation, exchange_id)))
            if not rows:  # replaced already (a repeated call), or gone
                done = list(await db.execute_fetchall(
                    "SELECT user_text, bot_text, created_at, exchange_id FROM exchanges "
                    "WHERE conversation = ? AND exchange_id = ?", (conversation, new_id)))
                return Exchange(*done[0]) if done else None
            row_id, user_text = rows[0]
            # The row keeps its number, so its place in the conversation; ratings keep the old id.
            await db.execute(
                "UPDATE exchanges SET bot_text = ?, exchange_id = ?, created_at = ? WHERE id = ?",
                (bot_text, new_id, now, row_id),
            )
            await db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation))
        return Exchange(user_text, bot_text, now, new_id)

    async def reset(self, conversation: str, *, at: float | None = None) -> bool:
        now = time.time()
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM exchanges WHERE conversation = ?", (conversation,))
            await db.execute("DELETE FROM feedback WHERE conversation = ?", (conversation,))
            await db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))
            await db.execute(
                "INSERT INTO forgotten (conversation, at) VALUES (?, ?) "
                "ON CONFLICT (conversation) DO UPDATE SET at = max(at, excluded.at)",
                (conversation, now if at is None else at),
            )
            await db.execute("DELETE FROM forgotten WHERE at < ?", (now - FORGET_KEPT,))
        return cursor.rowcount > 0

    async def sweep(self, idle_seconds: float) -> int:
        cutoff = time.time() - idle_seconds
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM exchanges WHERE conversation IN (SELECT id FROM conversations WHERE updated_at < ?)",
                (cutoff,),
            )
            await db.execute(
                "DELETE FROM feedback WHERE conversation IN (SELECT id FROM conversations WHERE updated_at < ?)",
                (cutoff,),
            )
            cursor = await db.execute("DELETE FROM conversations WHERE updated_at < ?", (cutoff,))
        return cursor.rowcount

    async def add_feedback(self, feedback: Feedback) -> bool:
        exchange = feedback.exchange
        async with self._transaction() as db:
            # One statement: the rating is stored only while its exchange is.
            cursor = await db.execute(
                "INSERT OR REPLACE INTO feedback (conversation, exchange_id, user, platform, rating, created_at) "
                "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM exchanges WHERE conversation = ? AND exchange_id = ?)",
                (exchange.conversation, exchange.id, feedback.user, feedback.platform, feedback.rating, feedback.at,
                 exchange.conversation, exchange.id),
            )
        return cursor.rowcount > 0

    async def list_feedback(
        self, *, since: float = 0.0, platform: str | None = None, limit: int | None = None
    ) -> list[Feedback]:
        query = "SELECT conversation, exchange_id, rating, user, platform, created_at FROM feedback WHERE created_at >= ?"
        params: list[object] = [since]
        if platform is not None:
            query += " AND platform = ?"
            params.append(platform)
        query += " ORDER BY created_at DESC"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        async with self._lock, self._conn.execute(query, params) as cursor:
            return [
                Feedback(ExchangeRef(conversation, exchange_id), rating, user, platform_, at)
                for conversation, exchange_id, rating, user, platform_, at in await cursor.fetchall()
            ]

    async def channel_settings(self, channel: str) -> dict[str, str]:
        async with self._lock, self._conn.execute(
            "SELECT name, value FROM channel_settings WHERE channel = ?", (channel,)
        ) as cursor:
            return {name: value for name, value in await cursor.fetchall()}

    async def set_channel_setting(self, channel: str, name: str, value: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO channel_settings (channel, name, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (channel, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (channel, name, value, time.time()),
            )

    async def reset_channel_settings(self, channel: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM channel_settings WHERE channel = ?", (channel,))
        return cursor.rowcount > 0


async def connect(path: Path) -> aiosqlite.Connection:
    """A connection to the file at `path` (made, with its folder, if missing) as every
    user of it here wants one: WAL, and deleted rows overwritten, not just unlinked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we say BEGIN/COMMIT ourselves (see `transaction`).
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA busy_timeout=5000")
        # Forgotten and expired conversations, and answered messages, are overwritten (many builds default to this).
        await db.execute("PRAGMA secure_delete=ON")
    except BaseException:
        await db.close()
        raise
    return db


@asynccontextmanager
async def transaction(db: aiosqlite.Connection, lock: asyncio.Lock) -> AsyncIterator[aiosqlite.Connection]:
    """`async with`: BEGIN IMMEDIATE ... COMMIT on `db` (one user at a time, by `lock`),
    rolled back if anything fails or is cancelled."""
    async with lock:
        try:
            await db.execute("BEGIN IMMEDIATE")
            yield db
            await db.execute("COMMIT")
        except BaseException:
            await _roll_back(db)
            raise


async def _roll_back(db: aiosqlite.Connection) -> None:
    """End the transaction a failed or cancelled step left open. Statements run in
    order on the connection's thread, so this also undoes a BEGIN whose await was
    cancelled but which runs after all; with no transaction open it is a no-op."""
    try:
        await asyncio.shield(db.execute("ROLLBACK"))
    except (sqlite3.OperationalError, ValueError):
        pass  # "no transaction is active" (the failure came before BEGIN took effect), or the store is closed


async def _columns(db: aiosqlite.Connection, table: str) -> list[str]:
    """The column names of `table` (none if there is no such table)."""
    return [row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")]
