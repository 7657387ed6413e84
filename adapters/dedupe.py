"""Remembering which platform events were already handled, so that a retried
or doubled delivery is answered once.

`DedupeStore` is the whole interface; `InProcessDedupe` keeps keys in this
process (bounded, expiring). A shared backend (Redis) can replace it when
several replicas receive the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class DedupeStore(Protocol):
    async def first_time(self, key: str, ttl: float) -> bool:
        """Record `key` for `ttl` seconds; True only for the first caller within that time."""


class InProcessDedupe:
    """Keys with an expiry, oldest first; at most `max_keys` of them.

    When full, the oldest key is forgotten first: only a retry arriving after
    `max_keys` newer events could then be answered twice.
    """

    def __init__(self, max_keys: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._expires: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys
        self._clock = clock
        self._lock = asyncio.Lock()

    async def first_time(self, key: str, ttl: float) -> bool:
        async with self._lock:
            now = self._clock()
            self._drop_expired(now)
            expires = self._expires.get(key)
            if expires is not None and expires > now:
                return False
            self._expires[key] = now + ttl
            self._expires.move_to_end(key)
            while len(self._expires) > self._max_keys:
                self._expires.popitem(last=False)
            return True

    def _drop_expired(self, now: float) -> None:
        # Keys are kept in insertion order; with similar ttls that is expiry order,
        # so expired keys sit at the front and this stops at the first live one.
        while self._expires:
            key, expires = next(iter(self._expires.items()))
            if expires > now:
                break
            del self._expires[key]

    def __len__(self) -> int:
        return len(self._expires)
