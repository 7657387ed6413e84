"""`redis://host:port/db[?prefix=...]`: history in Redis, shared by every replica.

One list per conversation (`<prefix>conv:<conversation>`), one JSON element per
exchange, so a user message is never stored without its reply. The push, the
trim to `max_turns` and the key's expiry are one Lua script, which first looks
for the exchange's id in the list: a command resent after a lost answer (the
client retries on a dropped connection) finds it there and stores nothing twice.
"Try again" replaces an element in place (LSET, in a script that finds it by id).

Idle conversations are forgotten by Redis itself: every stored exchange sets the
key to expire `ttl` seconds later, so `sweep` has nothing left to do (it returns
0) and no replica has to scan the keyspace. `ttl=0` keeps conversations forever.

Ratings of replies live in one hash per conversation (`<prefix>fb:<conversation>`,
a field per exchange id and user) that expires with the conversation's list and is
deleted with it; listing them scans those hashes (an operator's query, not the hot path).

Each channel's settings are one hash (`<prefix>settings:<channel>`, a field per
setting) that never expires: a channel's persona outlives its idle conversations.
"""

from __future__ import annotations

import json
import logging
import time

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from bot.memory.base import FORGET_KEPT, Exchange, ExchangeRef, Feedback, StoreUnavailable, new_exchange_id
from bot.redis_client import connect, split_prefix

log = logging.getLogger(__name__)

# KEYS: the conversation's list, its feedback hash, its last reset. ARGV: the element (JSON),
# its exchange id, max_turns, the expiry in ms (0: none), when the message was asked ('': any
# time). Returns the stored element: the one already there with that id, else the new one;
# nothing if the conversation was reset after the message was asked.
APPEND_ONCE = """
if ARGV[5] ~= '' then
  local forgotten = redis.call('GET', KEYS[3])
  if forgotten and tonumber(forgotten) > tonumber(ARGV[5]) then return false end
end
local elements = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #elements, 1, -1 do
  local ok, stored = pcall(cjson.decode, elements[i])
  if ok and type(stored) == 'table' and stored['id'] == ARGV[2] then
    return elements[i]
  end
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])  -- the ratings live as long as the conversation
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
return ARGV[1]
"""

# Replace an exchange's reply and id in its place in the list (LSET), and keep the
# conversation (and its ratings) alive as a new exchange would.
# KEYS: the conversation's list, its feedback hash. ARGV: the old id, the new id, the
# new reply, the time (JSON number), the expiry in ms (0: none). Returns the element
# now holding the new id (also when a repeated call finds it done), else nil.
REPLACE = """
local elements = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #elements, 1, -1 do
  local ok, stored = pcall(cjson.decode, elements[i])
  if ok and type(stored) == 'table' then
    if stored['id'] == ARGV[2] then
      return elements[i]
    end
    if stored['id'] == ARGV[1] then
      stored['id'] = ARGV[2]
      stored['bot'] = ARGV[3]
      stored['at'] = tonumber(ARGV[4])
      local element = cjson.encode(stored)
      redis.call('LSET', KEYS[1], i - 1, element)
      if tonumber(ARGV[5]) > 0 then
        redis.call('PEXPIRE', KEYS[1], ARGV[5])
        redis.call('PEXPIRE', KEYS[2], ARGV[5])
      end
      return element
    end
  end
end
return false
"""

# Store a rating only while the conversation still holds the rated exchange, and
# make the rating expire exactly when the conversation does.
# KEYS: the conversation's list, its feedback hash; ARGV: the exchange's id, field, value.
ADD_FEEDBACK = """
local found = false
for _, element in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local ok, data = pcall(cjson.decode, element)
  if ok and type(data) == 'table' and data['id'] == ARGV[1] then
    found = true
    break
  end
end
if not found then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('PERSIST', KEYS[2])
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
        self._add_feedback: AsyncScript | None = None
        self._replace: AsyncScript | None = None

    async def open(self) -> None:
        self._client = connect(self._url)
        self._append_once = self._client.register_script(APPEND_ONCE)
        self._add_feedback = self._client.register_script(ADD_FEEDBACK)
        self._replace = self._client.register_script(REPLACE)
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

    def _feedback_key(self, conversation: str) -> str:
        return f"{self.prefix}fb:{conversation}"

    def _settings_key(self, channel: str) -> str:
        return f"{self.prefix}settings:{channel}"

    def _forgotten_key(self, conversation: str) -> str:
        return f"{self.prefix}forgot:{conversation}"

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
                exchanges.append(_exchange(element))
            except (ValueError, KeyError, TypeError):
                # Written by something else under our prefix: skip it rather than lose the conversation.
                log.warning("Skipping a malformed exchange in conversation %s", conversation)
        return exchanges

    async def append_exchange(
        self, conversation: str, user_text: str, bot_text: str, *, exchange_id: str | None = None,
        asked_at: float | None = None,
    ) -> Exchange | None:
        exchange_id = exchange_id or new_exchange_id()
        element = json.dumps(
            {"id": exchange_id, "user": user_text, "bot": bot_text, "at": time.time()}, ensure_ascii=False
        )
        client = self._redis
        assert self._append_once is not None  # registered by open()
        try:
            stored = await self._append_once(
                keys=[self._key(conversation), self._feedback_key(conversation), self._forgotten_key(conversation)],
                args=[element, exchange_id, self._max_turns, self._ttl_ms, "" if asked_at is None else repr(asked_at)],
                client=client,
            )
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error
        return None if stored is None else _exchange(stored)

    async def replace_exchange(
        self, conversation: str, exchange_id: str, bot_text: str, *, new_id: str
    ) -> Exchange | None:
        client = self._redis
        assert self._replace is not None  # registered by open()
        try:
            stored = await self._replace(
                keys=[self._key(conversation), self._feedback_key(conversation)],
                args=[exchange_id, new_id, bot_text, repr(time.time()), self._ttl_ms],
                client=client,
            )
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error
        return None if stored is None else _exchange(stored)

    async def reset(self, conversation: str, *, at: float | None = None) -> bool:
        at = time.time() if at is None else at
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(conversation))
                pipe.delete(self._feedback_key(conversation))
                pipe.set(self._forgotten_key(conversation), repr(at), px=int(FORGET_KEPT * 1000))
                deleted, _, _ = await pipe.execute()
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error
        return deleted > 0

    async def sweep(self, idle_seconds: float) -> int:
        """Nothing to do: Redis expires a conversation `ttl` seconds after its last
        exchange (the store's `ttl`, MEMORY_TTL, stands in for `idle_seconds`)."""
        return 0

    async def add_feedback(self, feedback: Feedback) -> bool:
        exchange = feedback.exchange
        if not exchange.id:
            return False  # an exchange stored before exchange ids existed cannot be named
        value = json.dumps(
            {"id": exchange.id, "rating": feedback.rating, "user": feedback.user, "platform": feedback.platform,
             "rated_at": feedback.at}
        )
        keys = [self._key(exchange.conversation), self._feedback_key(exchange.conversation)]
        client = self._redis
        assert self._add_feedback is not None  # registered by open()
        try:
            stored = await self._add_feedback(keys=keys, args=[exchange.id, _field(feedback), value], client=client)
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error
        return bool(stored)

    async def list_feedback(
        self, *, since: float = 0.0, platform: str | None = None, limit: int | None = None
    ) -> list[Feedback]:
        start = len(self._feedback_key(""))
        rows = []
        try:
            async for key in self._redis.scan_iter(match=_glob_escape(self._feedback_key("")) + "*", count=500):
                conversation = (key.decode() if isinstance(key, bytes) else key)[start:]
                for value in (await self._redis.hgetall(key)).values():
                    row = _feedback_row(conversation, value)
                    if row is not None and row.at >= since and (platform is None or row.platform == platform):
                        rows.append(row)
        except RedisError as error:
            raise StoreUnavailable(f"could not read from Redis: {error}") from error
        rows.sort(key=lambda row: row.at, reverse=True)
        return rows[:limit] if limit is not None else rows

    async def channel_settings(self, channel: str) -> dict[str, str]:
        try:
            values = await self._redis.hgetall(self._settings_key(channel))
        except RedisError as error:
            raise StoreUnavailable(f"could not read from Redis: {error}") from error
        return {_text(name): _text(value) for name, value in values.items()}

    async def set_channel_setting(self, channel: str, name: str, value: str) -> None:
        try:
            await self._redis.hset(self._settings_key(channel), name, value)
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error

    async def reset_channel_settings(self, channel: str) -> bool:
        try:
            return bool(await self._redis.delete(self._settings_key(channel)))
        except RedisError as error:
            raise StoreUnavailable(f"could not write to Redis: {error}") from error


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _exchange(element: bytes | str) -> Exchange:
    """A stored element; raises ValueError, KeyError or TypeError if it is not one of ours.
    Elements stored before exchange ids existed have the id ""."""
    data = json.loads(element)
    return Exchange(data["user"], data["bot"], data["at"], str(data.get("id", "")))


def _field(feedback: Feedback) -> str:
    """One field per exchange and user: rating again replaces the earlier rating."""
    return f"{feedback.exchange.id}|{feedback.user}"


def _feedback_row(conversation: str, value: bytes | str) -> Feedback | None:
    try:
        data = json.loads(value)
        return Feedback(
            # Ratings stored before exchange ids named the exchange by its time: still counted, by id "".
            ExchangeRef(conversation, str(data.get("id", ""))), data["rating"], data["user"], data["platform"],
            float(data["rated_at"]),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("Skipping a malformed rating in conversation %s", conversation)
        return None


def _glob_escape(text: str) -> str:
    """`text` matched literally by SCAN's MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
