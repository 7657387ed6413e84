"""The inbox in Redis, shared by every replica: a Stream with one consumer group.

Accepting a message is one script run: the claim key (`claim:<key>`: the holding
process's token, with the lease as its expiry) is set unless a live claim or a
done mark is there, the entry is stored under `entry:<key>`, and a reference to it
(its key and conversation, no text) is added to the stream (XADD) and read into
the group's pending entries (XREADGROUP), where it stays until XACK. A replica
that dies leaves its entries pending and their claims lapse; any replica's scan
reads the entries pending for longer than a lease (XPENDING) and replays those
whose claim it can take. Finishing is one script run too: done mark, XACK, XDEL and the entry's
key deleted.

The text is kept out of the stream because XDEL only flags a stream entry: its
bytes stay in memory (and in every RDB/AOF rewrite) until all the entries of its
stream node are deleted, so one message pending for long would keep up to a
hundred answered messages' text. A key is freed when deleted. `entry:<key>`
existing while no claim does also tells `accept` that the message's holder died
(TAKEN), perhaps after delivering the answer. `waiting:<conversation>` (a sorted set
of stream ids by arrival) says which messages of a conversation are still waiting.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bot.inbox.base import Entry, Older, with_id
from bot.redis_client import DEFAULT_PREFIX, connect

GROUP = "replayers"
# Who holds an entry is its claim's business: one consumer name for all replicas keeps the
# group from growing a consumer per process ever started.
CONSUMER = "bot"

# KEYS: claim key, stream, entry key, the conversation's waiting set. ARGV: token, lease ms, group,
# consumer, message key, entry JSON, conversation, arrival.
ACCEPT = """
local held = redis.call('GET', KEYS[1])
if held then return {held == 'done' and 'done' or 'held'} end
local outcome = redis.call('EXISTS', KEYS[3]) == 1 and 'taken' or 'accepted'
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[6])
-- The group is made with the stream (an emptied Redis has neither); BUSYGROUP otherwise.
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[2], '*', 'key', ARGV[5], 'conversation', ARGV[7])
redis.call('ZADD', KEYS[4], ARGV[8], id)
-- Into the group's pending entries at once: every XADD is read in the same step,
-- so the entries new to the group are this one alone.
redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', 100, 'STREAMS', KEYS[2], '>')
return {outcome, id}
"""

# KEYS: claim key. ARGV: token, lease ms.
RECLAIM = """
local held = redis.call('GET', KEYS[1])
if held then return held == 'done' and 'done' or 'held' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'accepted'
"""

# KEYS: claim keys. ARGV: token, lease ms.
RENEW = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 0
"""

# KEYS: claim key, stream, entry key, the conversation's waiting set. ARGV: done ttl ms, group, stream id.
FINISH = """
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[1])
redis.call('DEL', KEYS[3])
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[4], ARGV[3])
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
  redis.call('XDEL', KEYS[2], ARGV[3])
end
return 0
"""

# KEYS: stream, entry key (or none), the conversation's waiting set. ARGV: group, stream id.
DROP = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if KEYS[2] ~= '' then redis.call('DEL', KEYS[2]) end
return 0
"""

# The conversation's waiting messages that arrived before ARGV[1] and are not done, except those of
# the keys in ARGV[3...]: the latest arrival among them and 1 if a live claim is on any of them (0 if
# all lapsed); false if none. Ids of entries gone from the stream leave the set. KEYS: the
# conversation's waiting set, stream. ARGV: arrival, claim key prefix, keys to leave out...
AHEAD = """
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local latest, in_hand = false, 0
local waiting = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'WITHSCORES')
for i = 1, #waiting, 2 do
  local id, arrived = waiting[i], waiting[i + 1]
  local found = redis.call('XRANGE', KEYS[2], id, id)
  if #found == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    local fields, key = found[1][2], nil
    for j = 1, #fields, 2 do if fields[j] == 'key' then key = fields[j + 1] end end
    local claim = key and redis.call('GET', ARGV[2] .. key)
    if key and not keep[key] and claim ~= 'done' then
      latest = arrived
      if claim then in_hand = 1 end
    end
  end
end
if not latest then return false end
return {latest, in_hand}
"""


class RedisInbox:
    name = "redis"
    durable = True

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, client: Redis | None = None) -> None:
        self._url = url
        self.prefix = prefix
        self.stream = f"{prefix}inbox"
        self._client = client
        self._own_client = client is None

    async def open(self) -> None:
        if self._client is None:
            self._client = connect(self._url)
        client = self._client
        self._accept = client.register_script(ACCEPT)
        self._reclaim = client.register_script(RECLAIM)
        self._renew = client.register_script(RENEW)
        self._finish = client.register_script(FINISH)
        self._drop = client.register_script(DROP)
        self._ahead = client.register_script(AHEAD)

    async def close(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None

    def _claim_key(self, key: str) -> str:
        return f"{self.prefix}claim:{key}"

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}entry:{key}"

    def _waiting_key(self, conversation: str) -> str:
        return f"{self.prefix}waiting:{conversation}"

    async def accept(self, entry: Entry, token: str, lease: float) -> tuple[str, Entry]:
        result = await self._accept(
            keys=[self._claim_key(entry.key), self.stream, self._entry_key(entry.key),
                  self._waiting_key(entry.conversation)],
            args=[token, _ms(lease), GROUP, CONSUMER, entry.key, entry.dumps(), entry.conversation,
                  repr(entry.arrived)],
        )
        outcome = _text(result[0])
        if len(result) < 2:
            return outcome, entry
        return outcome, with_id(entry, _text(result[1]))

    async def reclaim(self, entry: Entry, token: str, lease: float) -> str:
        return _text(await self._reclaim(keys=[self._claim_key(entry.key)], args=[token, _ms(lease)]))

    async def renew(self, keys: list[str], token: str, lease: float) -> None:
        await self._renew(keys=[self._claim_key(key) for key in keys], args=[token, _ms(lease)])

    async def finish(self, entry: Entry, done_ttl: float) -> None:
        await self._finish(
            keys=[self._claim_key(entry.key), self.stream, self._entry_key(entry.key),
                  self._waiting_key(entry.conversation)],
            args=[_ms(done_ttl), GROUP, entry.id],
        )

    async def drop(self, entry: Entry) -> None:
        """Only called once the message is done (its claim is a done mark): its text goes too."""
        await self._drop(
            keys=[self.stream, self._entry_key(entry.key), self._waiting_key(entry.conversation)],
            args=[GROUP, entry.id],
        )

    async def ahead(self, entry: Entry, keep: set[str]) -> Older | None:
        found = await self._ahead(
            keys=[self._waiting_key(entry.conversation), self.stream],
            args=[repr(entry.arrived), self._claim_key(""), *sorted(keep | {entry.key})],
        )
        return None if found is None else Older(float(found[0]), bool(int(found[1])))

    async def orphans(self, lease: float, limit: int) -> list[Entry]:
        """Entries pending for longer than a lease since they were accepted, oldest first; their
        claim decides whether anyone is still answering them. XPENDING only reads how long an
        entry has waited: a scan that finds an entry still claimed leaves it as old as it is, so a
        conversation's older messages are never found after its newer ones (XAUTOCLAIM, which
        this used, restarted the wait of every entry it looked at)."""
        try:
            pending = await self._redis.xpending_range(self.stream, GROUP, "-", "+", limit, idle=_ms(lease))
        except ResponseError as error:
            if "NOGROUP" in str(error):
                return []  # nothing was ever recorded
            raise
        if not pending:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in pending:
                pipe.xrange(self.stream, item["message_id"], item["message_id"])
            found = await pipe.execute()
        references: list[tuple[str, str, str, bytes | None]] = []  # (stream id, key, conversation, inline entry)
        for item, rows in zip(pending, found):
            id = _text(item["message_id"])
            if not rows:  # gone from the stream, left pending
                await self._redis.xack(self.stream, GROUP, id)
                continue
            fields = rows[0][1]
            # (Entries recorded before the text moved out of the stream carry it.)
            conversation = _text(fields.get(b"conversation", b""))
            references.append((id, _text(fields[b"key"]), conversation, fields.get(b"entry")))
        texts = await self._redis.mget([self._entry_key(key) for _, key, _, _ in references]) if references else []
        entries = []
        for (id, _, conversation, inline), text in zip(references, texts):
            if text is not None or inline is not None:
                entries.append(Entry.loads(text if text is not None else inline, id))
            else:  # finished or forgotten under another entry of its message (a retried event)
                await self._drop(keys=[self.stream, "", self._waiting_key(conversation)], args=[GROUP, id])
        return sorted(entries, key=lambda entry: _stream_order(entry.id))

    async def forget(self, conversation: str, before: float, keep: set[str], done_ttl: float) -> int:
        """Remove the conversation's entries that arrived before `before`, except those whose
        keys are in `keep`, and mark their messages done (a retry is not answered either)."""
        client = self._redis
        forgotten = 0
        for id in await client.zrangebyscore(self._waiting_key(conversation), "-inf", f"({before!r}"):
            found = await client.xrange(self.stream, min=id, max=id)
            if not found:
                await client.zrem(self._waiting_key(conversation), id)
                continue
            key = _text(found[0][1][b"key"])
            if key not in keep:
                await self.finish(Entry(key, "", conversation, "", "", id=_text(id)), done_ttl)
                forgotten += 1
        return forgotten

    async def depth(self) -> int:
        return int(await self._redis.xlen(self.stream))

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise RuntimeError("the Redis inbox is not open")
        return self._client


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_order(id: str) -> tuple[int, int]:
    milliseconds, _, sequence = id.partition("-")
    return int(milliseconds), int(sequence)
