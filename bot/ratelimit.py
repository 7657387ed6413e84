"""Per-user abuse limits: a token bucket for each user, and blocked users.

The engine calls `await limiter.acquire(user)` before answering. Over the
limit the first message gets `RateLimited(notify=True)` (one short notice),
later ones `RateLimited(notify=False)` (silence) until a token is back, so a
flood of messages never becomes a flood of notices. `RateLimiter` is the
interface: this in-process limiter can be swapped for one whose buckets live in
Redis, shared by several replicas (`bot.shared.RedisRateLimiter`); both share
`BucketLimiter`'s handling of blocked users, a limit of 0 and the notices.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from bot.config import Settings
from bot.errors import RateLimited, UserBlocked

log = logging.getLogger(__name__)

# Buckets kept at most; beyond it the least recently used go first. A full
# bucket is dropped earlier anyway: it is the same as no bucket.
MAX_BUCKETS = 100_000


class RateLimiter(Protocol):
    async def acquire(self, user: str) -> None:
        """Take one message's token for `user`, or raise `RateLimited` / `UserBlocked`."""

    async def admits(self, user: str) -> bool:
        """Whether `acquire(user)` would let a message through now; takes nothing."""


@dataclass
class _Bucket:
    tokens: float
    updated: float
    notified: bool = False  # the over-limit notice was sent since the bucket last had a token


class BucketLimiter:
    """What every token-bucket limiter does around its buckets: blocked users are
    refused, `per_minute=0` turns limiting off, and over the limit the first
    message is told once (`RateLimited(notify=True)`), later ones are silent.
    Subclasses keep the buckets (`_take`): here in this process, or in Redis."""

    def __init__(self, *, burst: int, per_minute: float, blocked: Iterable[str] = ()) -> None:
        self._burst = float(burst)
        self._rate = per_minute / 60.0  # tokens a second
        self._blocked = frozenset(blocked)

    async def acquire(self, user: str) -> None:
        if user in self._blocked:
            raise UserBlocked()
        if self._rate <= 0:
            return
        refused = await self._take(user)
        if refused is None:
            return
        retry_after, notify = refused
        if notify:  # once a flood, not once a message
            log.info("User %s is over the rate limit; silent for %.0fs", user, retry_after)
        raise RateLimited(retry_after, notify=notify)

    async def admits(self, user: str) -> bool:
        if user in self._blocked:
            return False
        return self._rate <= 0 or await self._has_token(user)

    async def _take(self, user: str) -> tuple[float, bool] | None:
        """Take a token of `user`'s bucket: None if there was one, else
        (seconds until there is one, whether this is the first refusal since)."""
        raise NotImplementedError

    async def _has_token(self, user: str) -> bool:
        """Whether `user`'s bucket has a token now, leaving it as it is."""
        raise NotImplementedError


class TokenBucketLimiter(BucketLimiter):
    """`burst` messages at once, then `per_minute` a minute; `per_minute=0` turns limiting off."""

    def __init__(
        self,
        *,
        burst: int,
        per_minute: float,
        blocked: Iterable[str] = (),
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(burst=burst, per_minute=per_minute, blocked=blocked)
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenBucketLimiter:
        return cls(
            burst=settings.rate_limit_burst,
            per_minute=settings.rate_limit_per_minute,
            blocked=settings.blocked_users,
        )

    async def _take(self, user: str) -> tuple[float, bool] | None:
        now = self._clock()
        bucket = self._refilled(user, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            bucket.notified = False
            return None
        notify = not bucket.notified
        bucket.notified = True
        return (1 - bucket.tokens) / self._rate, notify

    async def _has_token(self, user: str) -> bool:
        bucket = self._buckets.get(user)
        if bucket is None:
            return True  # no bucket: a full one
        return bucket.tokens + (self._clock() - bucket.updated) * self._rate >= 1

    def __len__(self) -> int:
        """Buckets held (for tests and metrics)."""
        return len(self._buckets)

    def _refilled(self, user: str, now: float) -> _Bucket:
        bucket = self._buckets.pop(user, None)
        if bucket is None:
            bucket = _Bucket(tokens=self._burst, updated=now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        self._evict(now)
        self._buckets[user] = bucket  # now the most recently used
        return bucket

    def _evict(self, now: float) -> None:
        """Drop idle buckets from the least recently used end: those full again
        by now, and any beyond `max_buckets`."""
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            full = oldest.tokens + (now - oldest.updated) * self._rate >= self._burst
            if not full and len(self._buckets) < self._max_buckets:
                return
            self._buckets.popitem(last=False)
