"""`memory://`: history kept in this process only, gone on restart."""

from __future__ import annotations

import time
from collections import deque

from bot.memory import Exchange, new_exchange_id


class InProcessStore:
    def __init__(self, *, max_turns: int) -> None:
        self._max_turns = max_turns
        self._conversations: dict[str, deque[Exchange]] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def history(self, conversation: str) -> list[Exchange]:
        return list(self._conversations.get(conversation, ()))

    async def append_exchange(
        self, conversation: str, user_text: str, bot_text: str, *, exchange_id: str | None = None
    ) -> None:
        exchanges = self._conversations.setdefault(conversation, deque(maxlen=self._max_turns))
        if exchange_id is not None and any(exchange.id == exchange_id for exchange in exchanges):
            return
        exchanges.append(Exchange(user_text, bot_text, time.time(), exchange_id or new_exchange_id()))

    async def reset(self, conversation: str) -> bool:
        return self._conversations.pop(conversation, None) is not None

    async def sweep(self, idle_seconds: float) -> int:
        cutoff = time.time() - idle_seconds
        idle = [key for key, exchanges in self._conversations.items() if exchanges and exchanges[-1].at < cutoff]
        for key in idle:
            del self._conversations[key]
        return len(idle)
