"""The inbox in the memory's SQLite file (two tables of its own, on a connection of
its own, so recording a message never waits behind a history write).

`claims` holds one row per message key: the process holding it and until when,
or a done mark and until when it is kept. `inbox` holds the entries, with their
conversation and arrival time as columns (for `forget` and the order of a
conversation across a crash). Accepting (claim + entry) and finishing (done mark
+ entry removed) are one transaction each, so a crash leaves either both or neither.

A process that opens the inbox while no other process has it open (a lock file
says so) takes its stopped predecessor's claims at once rather than waiting for
their leases to lapse: their messages are answered first, before new ones.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiosqlite

from bot.inbox.base import ACCEPTED, DONE, HELD, TAKEN, Entry, Older, with_id
from bot.memory.sqlite import connect, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_by_key ON inbox (key);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    done INTEGER NOT NULL,
    expires REAL NOT NULL
);
"""

# Added after the first release: tables made before get the columns on open, their rows the values
# from their entry.
CONVERSATION_COLUMNS = """
ALTER TABLE inbox ADD COLUMN conversation TEXT;
ALTER TABLE inbox ADD COLUMN arrived REAL;
"""
CONVERSATION_OF_OLD_ROWS = (
    "UPDATE inbox SET conversation = json_extract(entry, '$.conversation'), "
    "arrived = json_extract(entry, '$.arrived') WHERE conversation IS NULL"
)
CONVERSATION_INDEX = "CREATE INDEX IF NOT EXISTS inbox_by_conversation ON inbox (conversation, id)"

# Take the key unless a live claim or a done mark is on it.
CLAIM = """
INSERT INTO claims (key, holder, done, expires) VALUES (?, ?, 0, ?)
ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, done = 0, expires = excluded.expires
WHERE claims.expires <= ?
"""


class SQLiteInbox:
    name = "sqlite"
    durable = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._sole: int | None = None  # the lock file, held while no other process uses this inbox

    async def open(self) -> None:
        db = await connect(self.path)
        try:
            await db.executescript(SCHEMA)
            columns = [row[1] for row in await db.execute_fetchall("PRAGMA table_info(inbox)")]
            if "conversation" not in columns:
                await db.executescript(CONVERSATION_COLUMNS)
            await db.execute(CONVERSATION_OF_OLD_ROWS)
            await db.execute(CONVERSATION_INDEX)
            if self._take_sole_use():
                # No other process has the file: the claims left are a stopped process's, which will
                # never renew them. Lapsed now, its messages are answered at once, before new ones.
                await db.execute("UPDATE claims SET expires = 0 WHERE done = 0")
        except BaseException:
            await db.close()
            self._give_up_sole_use()
            raise
        self._db = db

    def _take_sole_use(self) -> bool:
        """Lock `<file>.inbox-lock` for as long as this store is open (the kernel lets go of it
        when the process dies, however it dies); False if another process holds it."""
        descriptor = os.open(f"{self.path}.inbox-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process (or a file system without locks): lapse by lease
            os.close(descriptor)
            return False
        self._sole = descriptor
        return True

    def _give_up_sole_use(self) -> None:
        if self._sole is not None:
            os.close(self._sole)  # closing releases the lock
            self._sole = None

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        self._give_up_sole_use()

    async def accept(self, entry: Entry, token: str, lease: float) -> tuple[str, Entry]:
        async with self._transaction() as db:
            rows = await db.execute_fetchall("SELECT done FROM claims WHERE key = ?", (entry.key,))
            outcome = await self._claim(db, entry.key, token, lease)
            if outcome != ACCEPTED:
                return outcome, entry
            if [done for (done,) in rows if not done]:  # a lapsed claim: its holder died, maybe mid-answer
                outcome = TAKEN
            cursor = await db.execute(
                "INSERT INTO inbox (key, entry, conversation, arrived) VALUES (?, ?, ?, ?)",
                (entry.key, entry.dumps(), entry.conversation, entry.arrived),
            )
            return outcome, with_id(entry, str(cursor.lastrowid))

    async def reclaim(self, entry: Entry, token: str, lease: float) -> str:
        async with self._transaction() as db:
            return await self._claim(db, entry.key, token, lease)

    async def renew(self, keys: list[str], token: str, lease: float) -> None:
        # Only these keys: a claim this process abandoned, or failed to mark done, must lapse.
        async with self._transaction() as db:
            await db.execute(
                "UPDATE claims SET expires = ? WHERE holder = ? AND done = 0 "
                "AND key IN (SELECT value FROM json_each(?))",
                (time.time() + lease, token, json.dumps(keys)),
            )

    async def finish(self, entry: Entry, done_ttl: float) -> None:
        now = time.time()
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO claims (key, holder, done, expires) VALUES (?, '', 1, ?) "
                "ON CONFLICT (key) DO UPDATE SET holder = '', done = 1, expires = excluded.expires",
                (entry.key, now + done_ttl),
            )
            # Every entry of the message: a retried event may have recorded it twice.
            await db.execute("DELETE FROM inbox WHERE key = ?", (entry.key,))
            # Forgotten done marks and lapsed claims of finished messages: the table stays small.
            await db.execute(
                "DELETE FROM claims WHERE expires <= ? AND key NOT IN (SELECT key FROM inbox)", (now,)
            )

    async def forget(self, conversation: str, before: float, keep: set[str], done_ttl: float) -> int:
        """Remove the conversation's entries that arrived before `before`, except those whose
        keys are in `keep`, and mark their messages done (a retry is not answered either)."""
        async with self._transaction() as db:
            rows = await db.execute_fetchall(
                "SELECT DISTINCT key FROM inbox WHERE conversation = ? AND arrived < ? "
                "AND key NOT IN (SELECT value FROM json_each(?))",
                (conversation, before, json.dumps(sorted(keep))),
            )
            keys = [key for (key,) in rows]
            await db.executemany(
                "INSERT INTO claims (key, holder, done, expires) VALUES (?, '', 1, ?) "
                "ON CONFLICT (key) DO UPDATE SET holder = '', done = 1, expires = excluded.expires",
                [(key, time.time() + done_ttl) for key in keys],
            )
            cursor = await db.execute(
                "DELETE FROM inbox WHERE key IN (SELECT value FROM json_each(?))", (json.dumps(keys),)
            )
        return cursor.rowcount

    async def ahead(self, entry: Entry, keep: set[str]) -> Older | None:
        async with self._lock:
            rows = await self._conn.execute_fetchall(
                "SELECT MAX(inbox.arrived), MAX(COALESCE(claims.expires > ?, 0)) "
                "FROM inbox LEFT JOIN claims ON claims.key = inbox.key "
                "WHERE inbox.conversation = ? AND inbox.arrived < ? AND COALESCE(claims.done, 0) = 0 "
                "AND inbox.key NOT IN (SELECT value FROM json_each(?))",
                (time.time(), entry.conversation, entry.arrived, json.dumps(sorted(keep | {entry.key}))),
            )
        latest, in_hand = list(rows)[0]
        return None if latest is None else Older(latest, bool(in_hand))

    async def drop(self, entry: Entry) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM inbox WHERE id = ?", (int(entry.id),))

    async def orphans(self, lease: float, limit: int) -> list[Entry]:
        query = (
            "SELECT inbox.id, inbox.entry FROM inbox LEFT JOIN claims ON claims.key = inbox.key "
            "WHERE claims.key IS NULL OR claims.done = 1 OR claims.expires <= ? ORDER BY inbox.id LIMIT ?"
        )
        async with self._lock:
            rows = await self._conn.execute_fetchall(query, (time.time(), limit))
        return [Entry.loads(text, str(id)) for id, text in rows]

    async def depth(self) -> int:
        async with self._lock:
            rows = await self._conn.execute_fetchall("SELECT COUNT(*) FROM inbox")
        return int(list(rows)[0][0])

    @staticmethod
    async def _claim(db: aiosqlite.Connection, key: str, token: str, lease: float) -> str:
        now = time.time()
        cursor = await db.execute(CLAIM, (key, token, now + lease, now))
        if cursor.rowcount:
            return ACCEPTED
        rows = list(await db.execute_fetchall("SELECT done FROM claims WHERE key = ?", (key,)))
        return DONE if rows and rows[0][0] else HELD

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite inbox is not open")
        return self._db

    def _transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        return transaction(self._conn, self._lock)
