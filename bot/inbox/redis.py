"""The inbox in Redis, shared by every replica: a Stream with one consumer group.

Accepting a message is one script run: the claim key (`claim:<key>`: the holding
process's token, with the lease as its expiry) is set unless a live claim or a
done mark is there, the entry is stored under `entry:<key>`, and a reference to it
(its key and conversation, no text) is added to the stream (XADD) and read into
the group's pending entries (XREADGROUP), where it stays until XACK. A replica
that dies leaves its entries pending and their claims lapse; any replica's scan
takes entries idle past the lease with XAUTOCLAIM and replays those whose claim it
can take. Finishing is one script run too: done mark, XACK, XDEL and the entry's
key deleted.

The text is kept out of the stream because XDEL only flags a stream entry: its
bytes stay in memory (and in every RDB/AOF rewrite) until all the entries of its
stream node are deleted, so one message pending for long would keep up to a
hundred answered messages' text. A key is freed when deleted. `entry:<key>`
existing while no claim does also tells `accept` that the message's holder died
(TAKEN), perhaps after delivering the answer.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bot.inbox import Entry, with_id
from bot.shared import DEFAULT_PREFIX, connect

GROUP = "replayers"
# Who holds an entry is its claim's business: one consumer name for all replicas keeps the
# group from growing a consumer per process ever started.
CONSUMER = "bot"

# KEYS: claim key, stream, entry key. ARGV: token, lease ms, group, consumer, message key, entry JSON,
# conversation.
ACCEPT = """
local held = redis.call('GET', KEYS[1])
if held then return {held == 'done' and 'done' or 'held'} end
local outcome = redis.call('EXISTS', KEYS[3]) == 1 and 'taken' or 'accepted'
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[6])
-- The group is made with the stream (an emptied Redis has neither); BUSYGROUP otherwise.
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[2], '*', 'key', ARGV[5], 'conversation', ARGV[7])
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

# KEYS: claim key, stream, entry key. ARGV: done ttl ms, group, stream id.
FINISH = """
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[1])
redis.call('DEL', KEYS[3])
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
  redis.call('XDEL', KEYS[2], ARGV[3])
end
return 0
"""

# KEYS: stream, entry key. ARGV: group, stream id.
DROP = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 0
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

    async def close(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None

    def _claim_key(self, key: str) -> str:
        return f"{self.prefix}claim:{key}"

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}entry:{key}"

    async def accept(self, entry: Entry, token: str, lease: float) -> tuple[str, Entry]:
        result = await self._accept(
            keys=[self._claim_key(entry.key), self.stream, self._entry_key(entry.key)],
            args=[token, _ms(lease), GROUP, CONSUMER, entry.key, entry.dumps(), entry.conversation],
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
            keys=[self._claim_key(entry.key), self.stream, self._entry_key(entry.key)],
            args=[_ms(done_ttl), GROUP, entry.id],
        )

    async def drop(self, entry: Entry) -> None:
        """Only called once the message is done (its claim is a done mark): its text goes too."""
        await self._drop(keys=[self.stream, self._entry_key(entry.key)], args=[GROUP, entry.id])

    async def orphans(self, lease: float, limit: int) -> list[Entry]:
        """Entries pending for longer than a lease (XAUTOCLAIM: idle since accepted or
        last looked at); their claim decides whether anyone is still answering them."""
        pending: list[tuple[str, str, bytes | None]] = []  # (stream id, message key, the entry if in the stream)
        start = "0-0"
        while len(pending) < limit:
            try:
                start, claimed, *_ = await self._redis.xautoclaim(
                    self.stream, GROUP, CONSUMER, _ms(lease), start_id=start, count=min(100, limit)
                )
            except ResponseError as error:
                if "NOGROUP" in str(error):
                    return entries  # nothing was ever recorded
                raise
            for id, fields in claimed:
                if fields:  # an entry deleted meanwhile comes back empty
                    # (Entries recorded before the text moved out of the stream carry it.)
                    pending.append((_text(id), _text(fields[b"key"]), fields.get(b"entry")))
            if _text(start) == "0-0":
                break
        texts = await self._redis.mget([self._entry_key(key) for _, key, _ in pending]) if pending else []
        entries, gone = [], []
        for (id, _, inline), text in zip(pending, texts):
            if text is not None or inline is not None:
                entries.append(Entry.loads(text if text is not None else inline, id))
            else:
                gone.append(id)  # finished or forgotten under another entry of its message (a retried event)
        if gone:
            await self._remove_references(gone)
        return sorted(entries, key=lambda entry: _stream_order(entry.id))

    async def forget(self, conversation: str, before: float, keep: set[str], done_ttl: float) -> int:
        """Remove the conversation's entries that arrived before `before`, except those whose
        keys are in `keep`, and mark their messages done (a retry is not answered either)."""
        found: list[tuple[str, str]] = []  # (stream id, message key)
        start = "-"
        while True:
            batch = await self._redis.xrange(self.stream, min=start, count=500)
            for id, fields in batch:
                if fields.get(b"conversation") == conversation.encode() and _text(fields[b"key"]) not in keep:
                    found.append((_text(id), _text(fields[b"key"])))
            if len(batch) < 500:
                break
            start = "(" + _text(batch[-1][0])
        texts = await self._redis.mget([self._entry_key(key) for _, key in found]) if found else []
        forgotten = 0
        for (id, key), text in zip(found, texts):
            if text is None or Entry.loads(text, id).arrived < before:
                await self.finish(Entry(key, "", conversation, "", "", id=id), done_ttl)
                forgotten += text is not None
        return forgotten

    async def _remove_references(self, ids: list[str]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()

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
