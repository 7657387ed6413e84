"""What people thought of the replies, for the operator (`GET /api/feedback`).

Counts by platform and rating over a window, and the latest rated exchanges of
web conversations with their text: the operator's own web API traffic. Slack's
and Discord's exchanges are only counted, their text never leaves the store.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.engine import shown_text
from bot.memory import BAD, RATINGS, ConversationStore, Feedback

WEB_PREFIX = "web:"


async def feedback_report(store: ConversationStore, *, since: float, recent: int) -> dict[str, Any]:
    """The JSON body of `GET /api/feedback`: counts since `since` (unix time) and the
    `recent` latest ratings of web conversations, newest first."""
    rows = await store.list_feedback(since=since)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row.platform, dict.fromkeys(RATINGS, 0))[row.rating] += 1
    total = sum(sum(by_rating.values()) for by_rating in counts.values())
    bad = sum(by_rating[BAD] for by_rating in counts.values())
    latest = await store.list_feedback(platform="web", limit=recent) if recent else []
    return {
        "since": since,
        "counts": counts,
        "total": total,
        "bad_share": bad / total if total else None,
        "recent": await asyncio.gather(*(_with_exchange(store, row) for row in latest)),
    }


async def _with_exchange(store: ConversationStore, row: Feedback) -> dict[str, Any]:
    conversation = row.exchange.conversation
    history = await store.history(conversation)
    exchange = next((e for e in history if e.id == row.exchange.id), None)
    return {
        "conversation": conversation.removeprefix(WEB_PREFIX),
        "exchange_id": row.exchange.id,
        "rating": row.rating,
        "user": row.user.removeprefix(WEB_PREFIX),
        "rated_at": row.at,
        # None once the exchange is no longer stored (trimmed away): the rating still counts.
        "exchange": None if exchange is None else {"id": exchange.id, "at": exchange.at, "user": exchange.user,
                                                   "bot": shown_text(exchange.bot)},
    }
