"""Per-conversation history behind one small interface.

A backend stores whole exchanges (a user message and the bot's reply): an
exchange is written in one step, so a crash never leaves half of one, and each
conversation keeps at most `max_turns` exchanges. Every exchange has an id
(`append_exchange(..., exchange_id=...)`, else a new one); appending an id the
conversation already holds does nothing, so a retried or replayed append never
stores an exchange twice. "Try again" replaces an exchange's reply in place
(`replace_exchange`): the new reply gets a new id, so a rating stays with the
reply that was rated (ratings of the replaced one are kept, still counted, and
never move to the new one). People's ratings of replies (feedback) name the
exchange by that id; they are kept with the conversation they belong to and
deleted with it (reset, idle sweep, expiry). A reset is remembered (its time,
no text) for FORGET_KEPT: an exchange answering a message asked before it is
not stored after it (a message replayed after a crash, or answered by another
replica). `open_store(url)` picks the backend from `MEMORY_URL`; a new backend
is one new module here.

The store also keeps each channel's settings (its persona, whether the bot listens
there: `ChannelSettings`), as named text values per channel, in the same place as the
conversations, so every replica sees the same. A channel's settings are not part of
any conversation: a `reset` or the idle sweep leaves them; only
`reset_channel_settings` deletes them (the engine does so when a person forgets a
DM, whose settings key is the DM's conversation key).
"""

from __future__ import annotations

from bot.memory.base import (
    BAD,
    CHANNEL_SETTING_NAMES,
    FORGET_KEPT,
    GOOD,
    LISTEN,
    PERSONA,
    RATINGS,
    ChannelSettings,
    ConversationStore,
    Exchange,
    ExchangeRef,
    Feedback,
    StoreUnavailable,
    new_exchange_id,
)

__all__ = [
    "BAD", "CHANNEL_SETTING_NAMES", "FORGET_KEPT", "GOOD", "LISTEN", "PERSONA", "RATINGS", "ChannelSettings",
    "ConversationStore", "Exchange", "ExchangeRef", "Feedback", "StoreUnavailable", "new_exchange_id", "open_store",
]


def open_store(url: str, *, max_turns: int, ttl: float = 0.0) -> ConversationStore:
    """The backend for `MEMORY_URL` (not yet opened: `await store.open()`)."""
    if url == "memory://":
        from bot.memory.inprocess import InProcessStore

        return InProcessStore(max_turns=max_turns)
    if url.startswith("sqlite:///"):
        from bot.memory.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :], max_turns=max_turns)
    if url.startswith(("redis://", "rediss://")):
        from bot.memory.redis import RedisStore

        return RedisStore(url, max_turns=max_turns, ttl=ttl)
    raise ValueError(f"unsupported MEMORY_URL {url!r}")
