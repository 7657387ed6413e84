"""`redis://host:port/db[?prefix=...]`: history in Redis, shared by every replica.

One list per conversation (`<prefix>conv:<conversation>`), one JSON element per
exchange, so a user message is never stored without its reply. The push, the
trim to `max_turns` and the key's expiry are one Lua script, which first looks
for the exchange's id in the list: a command resent after a lost answer (the
client retries on a dropped connection) finds it there and stores nothing twice.

Idle conversations are forgotten by Redis itself: every stored exchange sets the
key to expire `ttl` seconds later, so `sweep` has nothing left to do (it returns
0) and no replica has to scan the keyspace. `ttl=0` keeps conversations forever.
"""

from __future__ import annotations

import json
import logging
import time

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from bot.memory import Exchange, StoreUnavailable, new_exchange_id
from bot.shared import connect, split_prefix

log = logging.getLogger(__name__)

# KEYS[1]: the conversation's list. ARGV: the element (JSON), its exchange id,
# max_turns, the expiry in ms (0: none). Returns 1 if stored, 0 if already there.
APPEND_ONCE = """
local elements = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #elements, 1, -1 do
  local ok, stored = pcall(cjson.decode, elements[i])
  if ok and type(stored) == 'table' and stored['id'] == ARGV[2] then
    return 0
  end
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
"""


class RedisStore:
    def __init__(self, url: str, *, max_turns: int, ttl: float = 0.0, prefix: str | None = None) -> None:
        self._url, url_prefix = split_prefix(url)
        self.prefix = url_prefix if prefix is None else prefix
        self._max_turns = max_turns
        self._ttl_ms = int(ttl * 1000)
        self._client: Redis | None = None
        self._append_once: AsyncScript | None = None

    async def open(self) -> None:
        self._client = connect(self._url)
        self._append_once = self._client.register_script(APPEND_ONCE)
        try:
            await self._client.ping()
        except RedisError as error:
            # Start anyway: replies go on without memory, /readyz reports it, and the
            # client reconnects when Redis is back.
            log.warning("Redis memory store unreachable at start-up: %s", error)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise StoreUnavailable("the Redis store is not open")
        return self._client

    def _key(self, conversation: str) -> str:
        return f"{self.prefix}conv:{conversation}"

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise StoreUnavailable(f"Redis is unreachable: {error}") from error

    async def history(self, conversation: str) -> list[Exchange]:
        try:
            elements = await self._redis.lrange(self._key(conversation), 0, -1)
        except RedisError as error:
            raise StoreUnavailable(f"could not read from Redis: {error}") from error
        exchanges = []
        for element in elements:
            try:
                data = json.loads(element)
                exchanges.append(Exchange(data["user"], data["bot"], data["at"], str(data.get("id", ""))))
            except (ValueError, KeyError, TypeError):
                # Written by something else under our prefix: skip it rather than lose the conversation.
                log.warning("Skipping a malformed exchange in conversation %s", conversation)
        return exchanges

    async def append_exchange(
        self, conversation: str, user_text: str, bot_text: str, *, exchange_id: str | None = None
    ) -> None:
        exchange_id = exchange_id or new_exchange_id()
        element = json.dumps(
            {"id": exchange_id, "user": user_text, "bot": bot_text, "at": time.time()}, ensure_ascii=False
        )
        client = self._redis
        assert self._append_once is not None  # registered by open()
        try:
            await self._append_once(
                keys=[self._key(conversation)], args=[element, exchange_id, self._max_turns, self._ttl_ms],
                client=client,
            )
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error

    async def reset(self, conversation: str) -> bool:
        try:
            return await self._redis.delete(self._key(conversation)) > 0
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error

    async def sweep(self, idle_seconds: float) -> int:
        """Nothing to do: Redis expires a conversation `ttl` seconds after its last
        exchange (the store's `ttl`, MEMORY_TTL, stands in for `idle_seconds`)."""
        return 0
