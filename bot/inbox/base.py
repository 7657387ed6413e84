"""What the inbox and its stores share, below them all: a message's record (`Entry`),
a claim on it (`Claim`), the outcomes of accepting one, and the store's interface.
bot/inbox/__init__.py, above the stores, picks one and runs the inbox; the stores
import this module, never that one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

# What a claim attempt found.
ACCEPTED = "accepted"  # the message is ours to answer
TAKEN = "taken"  # ours to answer, taken over from a holder whose lease lapsed: its answer may be out already
HELD = "held"  # another handler (here or in another process) is answering it now
DONE = "done"  # it was answered


def exchange_id_for(key: str) -> str:
    """The id of the exchange answering the message `key` names (see `Entry.key`): an
    adapter can tell from a reply which exchange it is, knowing which message it answers."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One accepted message, as recorded: enough to answer and deliver it later."""

    key: str  # the platform's identity of the message: "discord:<id>", "slack:<team>:<channel>:<ts>"...
    platform: str
    conversation: str
    user: str
    text: str  # as the adapter will read it again on replay
    route: Mapping[str, Any] = field(default_factory=dict)  # where the answer goes (channel, thread, message...)
    arrived: float = field(default_factory=time.time)  # when this bot received it, seconds since the epoch
    id: str = ""  # the store's id of the entry (set once recorded)

    @property
    def exchange_id(self) -> str:
        """The id of the exchange that answers this message: the same in every
        process, so an answer stored before a crash is found, not made again."""
        return exchange_id_for(self.key)

    def dumps(self) -> str:
        fields = {name: getattr(self, name) for name in ("key", "platform", "conversation", "user", "text", "arrived")}
        return json.dumps({**fields, "route": dict(self.route)}, ensure_ascii=False)

    @classmethod
    def loads(cls, text: str | bytes, id: str) -> Entry:
        return cls(**json.loads(text), id=id)


class Older(NamedTuple):
    """What `InboxStore.ahead` found of a conversation's older messages still waiting."""

    latest: float  # when the latest of them arrived
    in_hand: bool  # a live process holds (is answering) at least one of them


@dataclass(frozen=True)
class Claim:
    """A message this process is answering. `recorded` is False when the store
    could not be written: the message is answered without the guarantee."""

    entry: Entry
    recorded: bool = True
    replayed: bool = False  # answered after its first handler died: its answer may be out already


class InboxStore(Protocol):
    """One backend (bot/inbox/sqlite.py, bot/inbox/redis.py, `InProcessInbox`). `token`
    names the process holding a claim; times are seconds."""

    name: str  # "sqlite", "redis"...: what an operator knows it by
    durable: bool  # survives this process (else nothing is ever replayed)

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def accept(self, entry: Entry, token: str, lease: float) -> tuple[str, Entry]:
        """Claim `entry.key` unless claimed or done, and if claimed record the entry, in one
        atomic step. The outcome (TAKEN rather than ACCEPTED when the key had a lapsed claim:
        its holder died, perhaps after delivering the answer), and the entry with its store id."""

    async def reclaim(self, entry: Entry, token: str, lease: float) -> str:
        """Claim the key of a recorded entry (for a replay) unless claimed or done."""

    async def renew(self, keys: list[str], token: str, lease: float) -> None:
        """Extend the lease of these keys' claims that `token` still holds."""

    async def finish(self, entry: Entry, done_ttl: float) -> None:
        """Mark the key done for `done_ttl` and remove the entry, in one atomic step."""

    async def drop(self, entry: Entry) -> None:
        """Remove the entry only (answered under another entry, or too old)."""

    async def orphans(self, lease: float, limit: int) -> list[Entry]:
        """Recorded entries whose claim may have lapsed, oldest first."""

    async def ahead(self, entry: Entry, keep: set[str]) -> Older | None:
        """The messages of `entry`'s conversation that arrived before it and are waiting
        (recorded, not done), `entry` itself and the keys in `keep` left out: when the latest
        of them arrived, and whether a live claim is on any; None if there is none."""

    async def forget(self, conversation: str, before: float, keep: set[str], done_ttl: float) -> int:
        """Remove `conversation`'s entries that arrived before `before` (but not those of the
        keys in `keep`) and mark their keys done for `done_ttl`; how many were removed."""

    async def depth(self) -> int:
        """Entries recorded and not yet removed."""


def with_id(entry: Entry, id: str) -> Entry:
    return replace(entry, id=id)
