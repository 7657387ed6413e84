"""What every memory backend shares, below them all: an exchange, a rating, a
channel's settings, the store's interface and its error. bot/memory/__init__.py,
above the backends, picks one for MEMORY_URL; the backends import this module,
never that one.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Exchange:
    user: str  # the user's message as the model saw it
    bot: str  # the reply exactly as decoded (may start with a space)
    at: float  # when it was stored, seconds since the epoch
    id: str = ""  # unique per exchange; what feedback and replays refer to


# How long a reset is remembered: far longer than a message waits for its answer (INBOX_MAX_AGE).
FORGET_KEPT = 86400.0


def new_exchange_id() -> str:
    return uuid.uuid4().hex


GOOD = "good"
BAD = "bad"
RATINGS = (GOOD, BAD)


@dataclass(frozen=True)
class ExchangeRef:
    """Which stored exchange a reply was: its conversation and its `Exchange.id`
    (what a Slack button, a Discord reaction or POST /api/feedback names)."""

    conversation: str
    id: str


@dataclass(frozen=True)
class Feedback:
    """One person's rating of one reply. No message text: the exchange holds that."""

    exchange: ExchangeRef
    rating: str  # GOOD or BAD
    user: str  # who rated, as the platform names them
    platform: str  # "slack", "discord", "web", "terminal"
    at: float  # when it was rated, seconds since the epoch


# The names of the channel settings a store keeps, and how their values are written.
PERSONA = "persona"  # the persona's lines, joined by newlines
LISTEN = "listen"  # "on" or "off"
CHANNEL_SETTING_NAMES = (PERSONA, LISTEN)


@dataclass(frozen=True)
class ChannelSettings:
    """What the people running a channel chose for the bot there (defaults where they chose nothing)."""

    persona: tuple[str, ...] = ()  # empty: the default persona, PERSONA
    listen: bool = False  # answer every message in the channel, not only those addressed to the bot

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> ChannelSettings:
        """The settings a store returned (`channel_settings`); unknown names are ignored."""
        persona = tuple(line for line in values.get(PERSONA, "").split("\n") if line.strip())
        return cls(persona=persona, listen=values.get(LISTEN) == "on")


class StoreUnavailable(RuntimeError):
    """The store could not be reached or written."""


class ConversationStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def history(self, conversation: str) -> list[Exchange]:
        """The stored exchanges, oldest first."""

    async def append_exchange(
        self, conversation: str, user_text: str, bot_text: str, *, exchange_id: str | None = None,
        asked_at: float | None = None,
    ) -> Exchange | None:
        """Store one whole exchange atomically, dropping the oldest beyond the limit;
        nothing if the conversation already holds `exchange_id`. The stored
        exchange (the one stored before, for a repeated id); None, nothing stored,
        if the conversation was reset after `asked_at` (when the message arrived)."""

    async def replace_exchange(
        self, conversation: str, exchange_id: str, bot_text: str, *, new_id: str
    ) -> Exchange | None:
        """Give the exchange `exchange_id` the reply `bot_text` and the id `new_id`, in its
        place (same user message, same position, `at` now), atomically; the conversation
        counts as active again. The new exchange; the one holding `new_id` already if a
        repeated call finds it done; None if the conversation holds neither (forgotten,
        trimmed away, or replaced by another). Ratings of the old reply are left as they
        are, under the old id: never moved to the new reply."""

    async def reset(self, conversation: str, *, at: float | None = None) -> bool:
        """Forget a conversation and its feedback, as of `at` (default now: see
        `append_exchange`); True if there was anything to forget."""

    async def sweep(self, idle_seconds: float) -> int:
        """Delete conversations idle longer than `idle_seconds`, with their feedback; returns how many."""

    async def add_feedback(self, feedback: Feedback) -> bool:
        """Record a rating (replacing that user's earlier rating of the same exchange),
        atomically with the check that the conversation still holds that exchange;
        False (nothing stored) if it does not: forgotten, expired or trimmed away."""

    async def list_feedback(
        self, *, since: float = 0.0, platform: str | None = None, limit: int | None = None
    ) -> list[Feedback]:
        """Ratings given at or after `since` (of one platform, if given), newest first."""

    async def ping(self) -> None:
        """Raise if the store cannot be used right now (for readiness checks)."""

    async def channel_settings(self, channel: str) -> dict[str, str]:
        """The settings stored for `channel`, name -> value ({} when none: the defaults)."""

    async def set_channel_setting(self, channel: str, name: str, value: str) -> None:
        """Store one setting of `channel` (one of CHANNEL_SETTING_NAMES), replacing its value."""

    async def reset_channel_settings(self, channel: str) -> bool:
        """Delete every setting of `channel`; True if there was any."""
