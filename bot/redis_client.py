"""The one kind of Redis client every shared piece uses: `connect(url)` (a bounded
connection pool, short timeouts, lost connections retried with exponential
backoff), the key prefix a URL names (`split_prefix`), and which Redis the
settings point at (`shared_redis_url`). Below the memory, the inbox and the
replicas' shared state, which all import it.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.config import Settings

DEFAULT_PREFIX = "blenderchat:"

# A failed command is tried 3 more times, 50, 100 and 200 ms apart: enough to ride
# over a dropped connection or a Redis restart, short enough that a reply is not
# held for long while Redis is really down.
RETRIES = 3
BACKOFF_BASE = 0.025
BACKOFF_CAP = 0.5


def split_prefix(url: str, default: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """The URL without our own `prefix` query option (redis-py would pass it on
    to the connection and fail), and the key prefix it named."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = default
    for name, value in query:
        if name == "prefix":
            prefix = value
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def connect(url: str, *, max_connections: int = 32, timeout: float = 5.0) -> Redis:
    """A client for `url` (not yet connected: connections are opened on first use)."""
    pool = BlockingConnectionPool.from_url(
        url,
        # Past this many commands in flight, callers wait up to `timeout` for a free connection.
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(
            ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE),
            RETRIES,
            supported_errors=(RedisConnectionError, RedisTimeoutError),
        ),
        # Idle pooled connections are checked before use, so a restarted Redis is noticed early.
        health_check_interval=15,
    )
    return Redis.from_pool(pool)


def shared_redis_url(settings: Settings) -> str | None:
    """REDIS_URL, or MEMORY_URL when that is a Redis and REDIS_URL is unset; None: no shared state."""
    if settings.redis_url:
        return settings.redis_url
    if settings.memory_url.startswith(("redis://", "rediss://")):
        return settings.memory_url
    return None
