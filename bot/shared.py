"""State shared by several replicas of the bot, kept in one Redis.

`SharedState.from_settings(settings)` opens a client (bot/redis_client.py) for
remembering whom Slack greeted (`RedisDedupeStore`), the per-user rate
limits (`RedisRateLimiter`) and the per-conversation locks
(`bot.locks.RedisLocks`); conversation history has its own client in
`bot.memory.redis.RedisStore`. Every key starts with a prefix (`blenderchat:`
unless the URL says `?prefix=...`), so one Redis can hold several bots or tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.config import Settings
from bot.locks import RedisLocks
from bot.memory.base import StoreUnavailable
from bot.metrics import Metrics
from bot.ratelimit import BucketLimiter
from bot.redis_client import DEFAULT_PREFIX, connect, shared_redis_url, split_prefix

log = logging.getLogger(__name__)


class RedisDedupeStore:
    """`first_time(key, ttl)` is True for exactly one of all replicas offered the
    same key within `ttl` seconds (SET NX with an expiry).

    While Redis is unreachable it answers True: a message answered twice is a
    smaller harm than a message never answered.
    """

    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX, metrics: Metrics | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._metrics = metrics

    async def first_time(self, key: str, ttl: float) -> bool:
        try:
            stored = await self._client.set(f"{self._prefix}seen:{key}", b"1", nx=True, px=max(1, int(ttl * 1000)))
        except RedisError as error:
            log.warning("Redis unreachable for de-duplication, treating %s as new: %s", key, error)
            if self._metrics is not None:
                self._metrics.errors.labels("dedupe").inc()
            return True
        return bool(stored)


# One token bucket per user in a hash (tokens, updated, notified), refilled and
# taken in one script run so replicas never race. Redis's own clock is used, so
# the replicas' clocks need not agree. Returns {allowed, retry_after, notify}.
TOKEN_BUCKET = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated', 'notified')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local allowed = 0
local notify = 0
local notified = state[3] or '0'
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
  notified = '0'
elseif notified == '0' then
  notify = 1
  notified = '1'
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now), 'notified', notified)
-- A bucket that would be full again is the same as none.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring((1 - tokens) / rate), notify}
"""


# Whether a bucket has a token now (TOKEN_BUCKET's arithmetic), changing nothing.
HAS_TOKEN = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or tonumber(ARGV[1])
local updated = tonumber(state[2]) or now
if tokens + math.max(0, now - updated) * tonumber(ARGV[2]) >= 1 then
  return 1
end
return 0
"""


class RedisRateLimiter(BucketLimiter):
    """The per-user token bucket of `bot.ratelimit` (`burst` messages at once, then
    `per_minute` a minute; the first message over the limit gets a notice, later
    ones silence), with the buckets in Redis so every replica counts the same
    messages. While Redis is unreachable messages are let through (logged,
    counted as `errors{kind="rate_limit"}`)."""

    def __init__(
        self,
        client: Redis,
        *,
        burst: int,
        per_minute: float,
        blocked: frozenset[str] = frozenset(),
        prefix: str = DEFAULT_PREFIX,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(burst=burst, per_minute=per_minute, blocked=blocked)
        self._script = client.register_script(TOKEN_BUCKET)
        self._peek = client.register_script(HAS_TOKEN)
        self._prefix = prefix
        self._metrics = metrics

    @classmethod
    def from_settings(
        cls, settings: Settings, client: Redis, *, prefix: str = DEFAULT_PREFIX, metrics: Metrics | None = None
    ) -> RedisRateLimiter:
        return cls(
            client,
            burst=settings.rate_limit_burst,
            per_minute=settings.rate_limit_per_minute,
            blocked=settings.blocked_users,
            prefix=prefix,
            metrics=metrics,
        )

    async def _take(self, user: str) -> tuple[float, bool] | None:
        try:
            allowed, retry_after, notify = await self._script(
                keys=[f"{self._prefix}bucket:{user}"], args=[self._burst, self._rate]
            )
        except RedisError as error:
            log.warning("Redis unreachable for rate limits, letting a message through: %s", error)
            if self._metrics is not None:
                self._metrics.errors.labels("rate_limit").inc()
            return None
        if allowed:
            return None
        return float(retry_after), bool(notify)

    async def _has_token(self, user: str) -> bool:
        try:
            return bool(await self._peek(keys=[f"{self._prefix}bucket:{user}"], args=[self._burst, self._rate]))
        except RedisError as error:
            log.debug("Redis unreachable for rate limits: %s", error)
            return True  # as `acquire` would let it through


@dataclass
class SharedState:
    """The Redis pieces a replica uses besides its memory store: pass `dedupe` to
    the Slack adapter, `locks` and `limiter` to the engine, `web_limiter` to the web app."""

    client: Redis
    prefix: str
    dedupe: RedisDedupeStore
    locks: RedisLocks
    limiter: RedisRateLimiter
    web_limiter: RedisRateLimiter  # per web API caller (WEB_RATE_LIMIT_PER_MINUTE), for bot.web

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None) -> SharedState | None:
        """None when no Redis is configured (one replica, in-process state)."""
        url = shared_redis_url(settings)
        if url is None:
            return None
        url, prefix = split_prefix(url)
        client = connect(url)
        return cls(
            client=client,
            prefix=prefix,
            dedupe=RedisDedupeStore(client, prefix=prefix, metrics=metrics),
            locks=RedisLocks(client, prefix=prefix, metrics=metrics),
            limiter=RedisRateLimiter.from_settings(settings, client, prefix=prefix, metrics=metrics),
            web_limiter=RedisRateLimiter(
                client,
                burst=max(1, settings.web_rate_limit_per_minute),
                per_minute=settings.web_rate_limit_per_minute,
                prefix=prefix,
                metrics=metrics,
            ),
        )

    async def ping(self) -> None:
        """Raise `StoreUnavailable` if Redis cannot be reached (for /readyz)."""
        try:
            await self.client.ping()
        except RedisError as error:
            raise StoreUnavailable(f"Redis is unreachable: {error}") from error

    async def close(self) -> None:
        await self.client.aclose()
