"""`memory://`: history kept in this process only, gone on restart."""

from __future__ import annotations

import time
from collections import deque

from bot.memory.base import FORGET_KEPT, Exchange, Feedback, new_exchange_id


class InProcessStore:
    def __init__(self, *, max_turns: int) -> None:
        self._max_turns = max_turns
        self._conversations: dict[str, deque[Exchange]] = {}
        # conversation -> (exchange id, user) -> rating; dropped with the conversation
        self._feedback: dict[str, dict[tuple[str, str], Feedback]] = {}
        self._settings: dict[str, dict[str, str]] = {}  # channel -> name -> value
        self._forgotten: dict[str, float] = {}  # conversation -> when it was last reset, oldest first

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def history(self, conversation: str) -> list[Exchange]:
        return list(self._conversations.get(conversation, ()))

    async def append_exchange(
        self, conversation: str, user_text: str, bot_text: str, *, exchange_id: str | None = None,
        asked_at: float | None = None,
    ) -> Exchange | None:
        if asked_at is not None and self._forgotten.get(conversation, 0.0) > asked_at:
            return None
        exchanges = self._conversations.setdefault(conversation, deque(maxlen=self._max_turns))
        if exchange_id:
            stored = next((exchange for exchange in exchanges if exchange.id == exchange_id), None)
            if stored is not None:
                return stored
        exchange = Exchange(user_text, bot_text, time.time(), exchange_id or new_exchange_id())
        exchanges.append(exchange)
        return exchange

    async def replace_exchange(
        self, conversation: str, exchange_id: str, bot_text: str, *, new_id: str
    ) -> Exchange | None:
        exchanges = self._conversations.get(conversation, deque())
        for index, exchange in enumerate(exchanges):
            if exchange.id == new_id:
                return exchange
            if exchange.id == exchange_id:
                exchanges[index] = Exchange(exchange.user, bot_text, time.time(), new_id)
                return exchanges[index]
        return None

    async def reset(self, conversation: str, *, at: float | None = None) -> bool:
        now = time.time()
        self._forgotten.pop(conversation, None)
        self._forgotten[conversation] = now if at is None else at
        while self._forgotten and next(iter(self._forgotten.values())) < now - FORGET_KEPT:
            del self._forgotten[next(iter(self._forgotten))]
        self._feedback.pop(conversation, None)
        return self._conversations.pop(conversation, None) is not None

    async def sweep(self, idle_seconds: float) -> int:
        cutoff = time.time() - idle_seconds
        idle = [key for key, exchanges in self._conversations.items() if exchanges and exchanges[-1].at < cutoff]
        for key in idle:
            del self._conversations[key]
            self._feedback.pop(key, None)
        return len(idle)

    async def add_feedback(self, feedback: Feedback) -> bool:
        conversation, exchange_id = feedback.exchange.conversation, feedback.exchange.id
        if not any(exchange.id == exchange_id for exchange in self._conversations.get(conversation, ())):
            return False
        self._feedback.setdefault(conversation, {})[(exchange_id, feedback.user)] = feedback
        return True

    async def list_feedback(
        self, *, since: float = 0.0, platform: str | None = None, limit: int | None = None
    ) -> list[Feedback]:
        rows = [
            feedback
            for ratings in self._feedback.values()
            for feedback in ratings.values()
            if feedback.at >= since and (platform is None or feedback.platform == platform)
        ]
        rows.sort(key=lambda feedback: feedback.at, reverse=True)
        return rows[:limit] if limit is not None else rows

    async def channel_settings(self, channel: str) -> dict[str, str]:
        return dict(self._settings.get(channel, {}))

    async def set_channel_setting(self, channel: str, name: str, value: str) -> None:
        self._settings.setdefault(channel, {})[name] = value

    async def reset_channel_settings(self, channel: str) -> bool:
        return self._settings.pop(channel, None) is not None
