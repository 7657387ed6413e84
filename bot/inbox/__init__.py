"""Every message the bot accepted is answered exactly once, even if the process
answering it is killed at any moment (within INBOX_MAX_AGE).

Two records per message, kept in the store the memory uses (a table of the
SQLite file; a Redis Stream and keys when Redis is configured):

- A **claim** on the message's key (the platform's id of that message): held by
  one process for a short lease (INBOX_LEASE), renewed while the reply is
  generated and sent, then turned into a **done** mark kept for DONE_TTL, past
  the platforms' retry windows. A retried or doubled event that finds a live
  claim or a done mark is dropped; one that finds a lapsed claim and no done
  mark is answered (its first handler died).
- An **inbox entry**: what is needed to answer and deliver later (platform,
  conversation, user, text, where to reply, when it arrived).

An adapter's handler takes the message's place in line first (bot/locks.py), then

    claim = await inbox.accept(entry)    # claim + record: one write, before the platform's ack
    if claim is None: return             # a duplicate
    ...answer (exchange id from the key), deliver (idempotently, see the adapters)...
    await inbox.finish(claim)            # done mark + entry removed: one write

From `open()` this process's claims are renewed; from `start()`, now and every
half lease, the entries whose claim lapsed (a dead process's) are answered,
oldest first, through each platform's `replay`; those older than INBOX_MAX_AGE
are dropped with one log line (whatever their platform), since an answer long
after the question confuses people. The stored exchange's id comes from the
message's key, so a message answered before the crash and not yet delivered is
delivered with the answer already stored, not a second one. A Slack retry that
takes over a lapsed claim is answered as a replay too (TAKEN).

A conversation keeps its order across a crash: a message accepted or replayed
while older messages of its conversation wait unanswered elsewhere holds the
messages that came after those (`keep_order`, bot/locks.py) until they are
answered, or replayed here, where a replay takes its place in line by its
arrival time. The hold lasts as long as a live process answers those older
messages; while none does (they wait for a replay), at most 3 leases, so that a
message no process can replay (its platform served by none) keeps nothing back
for good. A reset removes the conversation's waiting messages (`forget`).

A store that cannot be written (a full disk, Redis down) never costs a live
answer: the message is answered as before, without the guarantee, with one
warning per outage and `errors{kind="inbox"}` counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bot.config import Settings
from bot.inbox.base import (
    ACCEPTED,
    DONE,
    HELD,
    TAKEN,
    Claim,
    Entry,
    InboxStore,
    Older,
    exchange_id_for,
    with_id,
)
from bot.metrics import Metrics

if TYPE_CHECKING:
    from bot.engine import ReplyEngine

__all__ = [
    "ACCEPTED", "DONE", "HELD", "TAKEN", "Claim", "Entry", "InProcessInbox", "Inbox", "InboxStore", "Replayer",
    "exchange_id_for", "open_inbox", "with_id",
]

log = logging.getLogger(__name__)

# Done marks outlive Slack's retries (about 1 and 5 minutes after the event) by far.
DONE_TTL = 3600.0
# Entries looked at per scan; the rest wait for the next one.
SCAN_LIMIT = 500
# How often a conversation waiting for a stopped process's messages is looked at (seconds).
GATE_POLL = 0.5

class InProcessInbox:
    """Claims in this process only (MEMORY_URL=memory://, or an adapter built on its
    own): doubled and retried events are still answered once; nothing survives
    the process, so nothing is replayed. Bounded: the oldest claims go first."""

    name = "in-process"
    durable = False

    def __init__(self, max_keys: int = 100_000) -> None:
        self._claims: dict[str, tuple[str, float]] = {}  # key -> (token or DONE, expiry), oldest first
        self._max_keys = max_keys

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def accept(self, entry: Entry, token: str, lease: float) -> tuple[str, Entry]:
        return self._take(entry, token, lease), entry

    async def reclaim(self, entry: Entry, token: str, lease: float) -> str:
        outcome = self._take(entry, token, lease)
        return ACCEPTED if outcome == TAKEN else outcome

    def _take(self, entry: Entry, token: str, lease: float) -> str:
        now = time.monotonic()
        held = self._claims.get(entry.key)
        if held is not None and held[1] > now:
            return DONE if held[0] == DONE else HELD
        self._set(entry.key, token, now + lease)
        return TAKEN if held is not None and held[0] != DONE else ACCEPTED

    async def renew(self, keys: list[str], token: str, lease: float) -> None:
        expires = time.monotonic() + lease
        for key in keys:
            if self._claims.get(key, ("", 0.0))[0] == token:
                self._claims[key] = (token, expires)

    async def finish(self, entry: Entry, done_ttl: float) -> None:
        self._set(entry.key, DONE, time.monotonic() + done_ttl)

    async def drop(self, entry: Entry) -> None:
        pass

    async def orphans(self, lease: float, limit: int) -> list[Entry]:
        return []

    async def ahead(self, entry: Entry, keep: set[str]) -> Older | None:
        return None  # nothing survives a stopped process here

    async def forget(self, conversation: str, before: float, keep: set[str], done_ttl: float) -> int:
        return 0  # no entries here, only claims

    async def depth(self) -> int:
        return 0

    def _set(self, key: str, holder: str, expires: float) -> None:
        self._claims.pop(key, None)
        self._claims[key] = (holder, expires)
        while len(self._claims) > self._max_keys:
            del self._claims[next(iter(self._claims))]


Replayer = Callable[[Claim], None]
"""A platform's `replay(claim)`: synchronously takes the message's place in line and
starts answering and delivering it (so replays keep their arrival order)."""


class Inbox:
    """The claims and the inbox as adapters use them, with the metrics, the renewal
    of this process's claims, the replay of dead processes' messages, and the
    degradation to answering without a guarantee while the store is unusable."""

    def __init__(self, store: InboxStore, settings: Settings, metrics: Metrics | None = None) -> None:
        self.store = store
        self.lease = settings.inbox_lease
        self.max_age = settings.inbox_max_age
        self.metrics = metrics or Metrics()
        self.token = uuid.uuid4().hex  # this process, as the holder of its claims
        self._held: dict[str, Entry] = {}  # key -> the entry being answered here
        self._replayers: dict[str, Replayer] = {}
        self.failure: str | None = None  # why the store failed last time (warned once), until it works again
        self._runner: asyncio.Task[None] | None = None  # the scans, from start()
        self._renewer: asyncio.Task[None] | None = None  # the renewal of claims, from open()
        self._hold: Callable[[str, float], Callable[[], None]] | None = None
        # Messages held behind older ones of their conversation not answered here: key -> the
        # message, its hold's release, and until when it may be held while nobody answers those.
        self._gates: dict[str, tuple[Entry, Callable[[], None], float]] = {}
        self._look_again = asyncio.Event()  # a gate was set: scan soon
        self._closed = False

    @classmethod
    def in_process(cls, settings: Settings, metrics: Metrics | None = None) -> Inbox:
        return cls(InProcessInbox(), settings, metrics)

    def keep_order(self, hold: Callable[[str, float], Callable[[], None]]) -> None:
        """How to hold a conversation's new messages (`ReplyEngine.hold_line`) while older
        messages of it, left by a stopped process, wait to be replayed."""
        self._hold = hold

    def attach(self, engine: ReplyEngine) -> None:
        """Work with `engine`: hold its conversations' lines to keep their order across a
        crash, and forget a conversation's waiting messages when it forgets the conversation."""
        self.keep_order(engine.hold_line)
        engine.on_forget(self.forget)

    async def open(self) -> None:
        """Open the store and renew this process's claims from now on (messages are accepted
        before `start()`, while the platforms connect)."""
        try:
            await self.store.open()
        except Exception as error:
            self._failed("open", error)
        self._renewer = asyncio.create_task(self._renew_forever(), name="inbox-renewal")

    async def close(self) -> None:
        self._closed = True
        for task in (self._runner, self._renewer):
            if task is not None:
                task.cancel()
                # A cancellation a library swallows (turned into a timeout it retries) still ends
                # the task: it looks at `_closed` before going round again.
                await asyncio.wait({task}, timeout=self.lease)
        self._runner = self._renewer = None
        for _, release, _ in self._gates.values():
            release()
        self._gates.clear()
        await self.store.close()

    # -- what adapters call ---------------------------------------------------

    async def accept(self, entry: Entry) -> Claim | None:
        """Claim and record a message as it arrives; None: it is answered already, or
        being answered (a duplicate, counted). Never raises: with the store unusable
        the message is answered all the same, unrecorded."""
        try:
            outcome, entry = await self.store.accept(entry, self.token, self.lease)
        except Exception as error:
            self._failed("record a message in", error)
            return Claim(entry, recorded=False)
        self._worked()
        if outcome not in (ACCEPTED, TAKEN):
            self.metrics.inbox_duplicates.labels(entry.platform).inc()
            log.debug("Message %s is %s: not answered again", entry.key, outcome)
            return None
        self._held[entry.key] = entry
        if outcome == TAKEN:
            # A retry of a message whose first handler died: answered as a replay, so the
            # adapter looks for an answer already delivered before posting one.
            self.metrics.inbox_replayed.labels(entry.platform).inc()
        await self._hold_behind_older(entry)
        return Claim(entry, replayed=outcome == TAKEN)

    async def _hold_behind_older(self, entry: Entry) -> None:
        """If older messages of the conversation are waiting and not being answered here (a
        stopped process's, or another replica's), hold the messages of the conversation that
        arrived after them until they are answered, or replayed here ahead of those."""
        if self._hold is None or not self.store.durable:
            return
        try:
            older = await self.store.ahead(entry, set(self._held))
        except Exception as error:
            self._failed("look for older messages in", error)
            return
        if older is None:
            return
        log.debug("A message in %s waits for older ones not answered yet", entry.conversation)
        release = self._hold(entry.conversation, older.latest)
        self._gates[entry.key] = (entry, release, time.monotonic() + self.patience)
        self._look_again.set()

    @property
    def patience(self) -> float:
        """How long a held message waits for older ones that no live process answers (a replay
        takes them within a lease or two of their holder's death)."""
        return 3 * self.lease

    async def finish(self, claim: Claim) -> None:
        """The message was answered and its answer delivered (or deliberately not
        sent): mark it done and remove it from the inbox."""
        self._held.pop(claim.entry.key, None)
        if not claim.recorded:
            return
        try:
            await self.store.finish(claim.entry, DONE_TTL)
        except Exception as error:
            # It will look unanswered once its lease lapses: the replay's delivery check catches that.
            self._failed("mark a message answered in", error)
        else:
            self._worked()

    def abandon(self, claim: Claim) -> None:
        """Stop renewing a claim whose answer was cut short (a shutdown): once the
        lease lapses, another process or the next start answers it."""
        self._held.pop(claim.entry.key, None)

    async def forget(self, conversation: str, since: float) -> None:
        """`conversation` was forgotten (a reset) as of `since`: its messages that arrived before
        and are not being answered here leave the inbox, text and all, and are not answered
        later (nor their retries). Never raises."""
        try:
            removed = await self.store.forget(conversation, since, set(self._held), DONE_TTL)
        except Exception as error:
            self._failed("forget messages in", error)
            return
        self._worked()
        if removed:
            log.info("Removed %d unanswered messages of forgotten conversation %s from the inbox",
                     removed, conversation)  # fmt: skip

    def count_duplicate(self, platform: str) -> None:
        """A delivery found already done (a replay whose answer was out before the crash)."""
        self.metrics.inbox_duplicates.labels(platform).inc()

    # -- renewal and replay ------------------------------------------------

    def start(self, replayers: Mapping[str, Replayer]) -> None:
        """Replay lapsed entries through `replayers` (platform -> replay), now and every half
        lease (more often while a conversation waits for its older messages), until `close()`."""
        self._replayers = dict(replayers)
        self._runner = asyncio.create_task(self._run(), name="inbox")

    async def _run(self) -> None:
        while not self._closed:
            self._look_again.clear()
            await self.scan()
            await self._open_gates()
            wait = GATE_POLL if self._gates else self.lease / 2
            try:
                await asyncio.wait_for(self._look_again.wait(), wait)
            except TimeoutError:
                pass

    async def _open_gates(self) -> None:
        """Let each held message go on once the older messages of its conversation are answered
        or replayed here (their replays, started by the scan just made, are in line ahead of it)."""
        for key, (entry, release, until) in list(self._gates.items()):
            try:
                older = await self.store.ahead(entry, set(self._held))
            except Exception as error:
                self._failed("look for older messages in", error)
                older = Older(0.0, in_hand=False)  # unknown: still waiting, as far as we know
            if older is not None and older.in_hand:
                # A live process answers them (a replay, or a replica answering in turn): wait for it.
                self._gates[key] = (entry, release, time.monotonic() + self.patience)
                continue
            if older is not None and time.monotonic() < until:
                continue
            if older is not None:
                log.warning("Answering a message in %s before older ones still not answered", entry.conversation)
            del self._gates[key]
            release()

    async def _renew_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.lease / 3)
            await self._renew()

    async def _renew(self) -> None:
        if not self._held:
            return
        try:
            await self.store.renew(list(self._held), self.token, self.lease)
        except Exception as error:
            self._failed("renew claims in", error)

    async def scan(self) -> int:
        """Answer the entries no live process is answering, oldest first; how many were started."""
        if not self.store.durable:
            return 0
        try:
            entries = await self.store.orphans(self.lease, SCAN_LIMIT)
            self.metrics.inbox_depth.set(await self.store.depth())
        except Exception as error:
            self._failed("replay messages from", error)
            return 0
        claims, expired, error = await self._claim_orphans(entries)
        if error is None:
            self._worked()
        else:
            self._failed("replay messages from", error)  # the rest waits for the next scan
        if expired:
            counts = ", ".join(f"{platform} {count}" for platform, count in sorted(expired.items()))
            log.warning(
                "Dropped %d unanswered messages older than INBOX_MAX_AGE=%gs (%s): too late to answer",
                sum(expired.values()), self.max_age, counts,
            )  # fmt: skip
        if claims:
            log.info("Answering %d messages left unanswered by a stopped process", len(claims))
        for claim in claims:  # a replay too waits for older messages of its conversation answered elsewhere
            await self._hold_behind_older(claim.entry)
        # Synchronously, oldest first: each takes its place in its conversation's line in arrival order.
        for claim in claims:
            self.metrics.inbox_replayed.labels(claim.entry.platform).inc()
            self._replayers[claim.entry.platform](claim)
        return len(claims)

    async def _claim_orphans(self, entries: list[Entry]) -> tuple[list[Claim], Counter[str], Exception | None]:
        """Claim what can be answered here and drop what is answered or too old. A store error
        stops the scan but keeps what it claimed so far: those are replayed now, not held
        (and renewed) forever unanswered."""
        claims: list[Claim] = []
        expired: Counter[str] = Counter()
        now = time.time()
        for entry in entries:
            if entry.key in self._held:
                continue  # answered here right now
            too_old = now - entry.arrived > self.max_age
            # Age first: an entry of a platform no process runs any more would otherwise stay for good.
            if not too_old and entry.platform not in self._replayers:
                continue  # another process serves that platform
            try:
                outcome = await self.store.reclaim(entry, self.token, self.lease)
                if outcome == DONE:
                    await self.store.drop(entry)  # answered under another entry (a retried event)
                elif outcome == ACCEPTED and too_old:
                    await self.store.finish(entry, DONE_TTL)
                    expired[entry.platform] += 1
                    self.metrics.inbox_expired.labels(entry.platform).inc()
                elif outcome == ACCEPTED:
                    self._held[entry.key] = entry
                    claims.append(Claim(entry, replayed=True))
            except Exception as error:
                return claims, expired, error
        return claims, expired, None

    # -- the store's health --------------------------------------------------

    def _failed(self, doing: str, error: Exception) -> None:
        self.metrics.errors.labels("inbox").inc()
        self.metrics.dependency_up.labels("inbox").set(0)
        if self.failure is None:
            log.warning(
                "Could not %s the inbox (%s: %s): messages are still answered, but one cut short by a crash "
                "now would be lost; retrying with each message",
                doing, type(error).__name__, error,
            )  # fmt: skip
        self.failure = type(error).__name__  # its kind: the text can name hosts and paths (for /readyz)

    def _worked(self) -> None:
        self.metrics.dependency_up.labels("inbox").set(1)
        if self.failure is not None:
            self.failure = None
            log.info("The inbox works again: accepted messages survive a crash again")


def open_inbox(settings: Settings, metrics: Metrics | None = None) -> Inbox:
    """The inbox next to the memory: in Redis when one is configured (shared by every
    replica), else in the SQLite file, else in this process only (not yet opened)."""
    from bot.redis_client import shared_redis_url, split_prefix

    url = shared_redis_url(settings)
    if url is not None:
        from bot.inbox.redis import RedisInbox

        url, prefix = split_prefix(url)
        return Inbox(RedisInbox(url, prefix=prefix), settings, metrics)
    if settings.memory_path is not None:
        from bot.inbox.sqlite import SQLiteInbox

        return Inbox(SQLiteInbox(settings.memory_path), settings, metrics)
    return Inbox.in_process(settings, metrics)
