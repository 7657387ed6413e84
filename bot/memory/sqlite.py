"""`sqlite:///path.db`: history in one SQLite file that survives restarts.

One row per exchange, so a user message is never stored without its reply;
the insert, the conversation's timestamp and the trimming to `max_turns` are
one transaction. Ratings of replies sit in `feedback`, deleted in the same
transaction as their conversation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from bot.memory import Exchange, ExchangeRef, Feedback, StoreUnavailable

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
CREATE TABLE IF NOT EXISTS feedback (
    conversation TEXT NOT NULL,
    exchange_at REAL NOT NULL,
    user TEXT NOT NULL,
    platform TEXT NOT NULL,
    rating TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (conversation, exchange_at, user)
);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (created_at);
"""


class SQLiteStore:
    def __init__(self, path: str | Path, *, max_turns: int) -> None:
        self.path = Path(path).expanduser()
        self._max_turns = max_turns
        self._db: aiosqlite.Connection | None = None
        # One connection: its statements must not interleave across transactions.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we say BEGIN/COMMIT ourselves, so one exchange is one transaction.
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            # Forgotten and expired conversations are overwritten, not just unlinked (many builds default to this).
            await db.execute("PRAGMA secure_delete=ON")
            await db.executescript(SCHEMA)
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

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._conn
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def ping(self) -> None:
        async with self._lock:
            await self._conn.execute("SELECT 1")

    async def history(self, conversation: str) -> list[Exchange]:
        async with self._lock, self._conn.execute(
            "SELECT user_text, bot_text, created_at FROM exchanges WHERE conversation = ? ORDER BY id",
            (conversation,),
        ) as cursor:
            return [Exchange(user, bot, at) for user, bot, at in await cursor.fetchall()]

    async def append_exchange(self, conversation: str, user_text: str, bot_text: str) -> Exchange:
        now = time.time()
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO exchanges (conversation, user_text, bot_text, created_at) VALUES (?, ?, ?, ?)",
                (conversation, user_text, bot_text, now),
            )
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
        return Exchange(user_text, bot_text, now)

    async def reset(self, conversation: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM exchanges WHERE conversation = ?", (conversation,))
            await db.execute("DELETE FROM feedback WHERE conversation = ?", (conversation,))
            await db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))
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
                "INSERT OR REPLACE INTO feedback (conversation, exchange_at, user, platform, rating, created_at) "
                "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM exchanges WHERE conversation = ? AND created_at = ?)",
                (exchange.conversation, exchange.at, feedback.user, feedback.platform, feedback.rating, feedback.at,
                 exchange.conversation, exchange.at),
            )
        return cursor.rowcount > 0

    async def list_feedback(
        self, *, since: float = 0.0, platform: str | None = None, limit: int | None = None
    ) -> list[Feedback]:
        query = "SELECT conversation, exchange_at, rating, user, platform, created_at FROM feedback WHERE created_at >= ?"
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
                Feedback(ExchangeRef(conversation, exchange_at), rating, user, platform_, at)
                for conversation, exchange_at, rating, user, platform_, at in await cursor.fetchall()
            ]
