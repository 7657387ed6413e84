"""Per-conversation order: the messages of one conversation are answered one
at a time, in the order they arrived, each seeing the exchange before it.

The order is fixed at intake, synchronously, before anything can await:

    ticket = engine.take_ticket(conversation)   # in the platform's event handler, first thing
    ...dedupe, typing, name lookups: anything slow, in any order...
    answer = await engine.reply(conversation, text, ticket=ticket)   # waits for the ticket's turn
    ...post the answer...
    ticket.release()                            # on every path: done, duplicate, error, cancelled

`ConversationLines` keeps one first-come-first-served line of `Ticket`s per
conversation in this process. A ticket's turn comes when every ticket taken
before it in that conversation was released; releasing is idempotent, so a
`finally:` (or `with ticket:`) always frees the place and the conversation can
never wedge. Whoever takes a ticket releases it: an adapter hands it to
`ReplyTasks.spawn(..., ticket=ticket)`, which releases it however the task ends;
the web API holds it for its request; `reply()` called without one takes and
releases its own (the terminal chat). Holding the ticket until the answer is
sent keeps the answers in order too. Messages replayed later (after a restart)
take their tickets with the time they arrived (`take(conversation, arrived=...)`):
each goes ahead of the tickets of messages that arrived after it and whose turn has
not started. A conversation can be held (`hold`) while older messages of it wait
elsewhere (a stopped process's, to be replayed here, or another replica's): until
released, the messages that arrived after those do not take their turn, so a new
message cannot overtake older ones (bot/inbox).

With several replicas, `RedisLocks` also keeps other replicas out of the
conversation while its reply is read, generated and stored. The engine layers
them: the ticket's turn in this process first, then the shared lock, so a
replica asks Redis for at most one lock per conversation at a time and its own
messages keep their arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, RedisError

from bot.metrics import Metrics

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)


class ConversationLock(Protocol):
    """One use of one conversation's lock: acquire once, then release once."""

    async def acquire(self) -> None: ...

    async def release(self) -> None: ...

    async def __aenter__(self) -> None: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class ConversationLocks(Protocol):
    def lock(self, conversation: str) -> ConversationLock: ...


class _Held:
    """`async with lock:` for the classes below."""

    async def acquire(self) -> None:
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


class Ticket:
    """A message's place in its conversation's line (see the module docstring).
    `with ticket:` releases it at the end of the block."""

    def __init__(self, lines: ConversationLines, conversation: str, arrived: float | None = None) -> None:
        self.conversation = conversation
        self.arrived = time.time() if arrived is None else arrived  # when its message arrived
        self._lines = lines
        self._called = asyncio.Event()
        self.started = False  # its turn came and was taken: nothing goes ahead of it any more
        self.released = False

    @property
    def ahead(self) -> int:
        """How many messages of the conversation are in line before this one (0: its turn)."""
        return self._lines._ahead(self)

    async def turn(self) -> None:
        """Return once every ticket ahead of this one was released and no hold keeps this
        one's message back (see `ConversationLines.hold`)."""
        if self.released:
            raise RuntimeError(f"a released ticket of conversation {self.conversation} has no turn")
        if self.started:
            return  # asked again within its turn (a follow-up's check, then its answer)
        while True:
            await self._called.wait()
            holds = self._lines._holds.get(self.conversation, ())
            held = next((hold for hold in holds if self.arrived > hold.after), None)
            if held is not None:
                await held.released.wait()  # then look again: a replayed message may have gone ahead meanwhile
            elif self._called.is_set():
                self.started = True
                return

    def release(self) -> None:
        """Leave the line, letting the next ticket have its turn; later calls do nothing."""
        if not self.released:
            self.released = True
            self._lines._leave(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class _Hold:
    """A held conversation: its messages that arrived after `after` wait until `released`."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.released = asyncio.Event()


class _Line(deque[Ticket]):
    refusing = False  # a message was turned away since the line last took one (see `refuse`)


class ConversationLines:
    """A first-come-first-served line of tickets per conversation, removed once
    empty, so the table stays as small as the set of active conversations."""

    def __init__(self) -> None:
        self._lines: dict[str, _Line] = {}
        self._holds: dict[str, list[_Hold]] = {}

    def take(self, conversation: str, arrived: float | None = None) -> Ticket:
        """A place at the end of `conversation`'s line; synchronous, so the order is the order of
        calls. With `arrived` (a replayed message), ahead of the tickets of messages that
        arrived later and whose turn has not started."""
        line = self._lines.setdefault(conversation, _Line())
        ticket = Ticket(self, conversation, arrived)
        place = len(line)
        if arrived is not None:
            while place > 0 and not line[place - 1].started and line[place - 1].arrived > arrived:
                place -= 1
        line.insert(place, ticket)
        if place == 0:
            if len(line) > 1:
                line[1]._called.clear()  # its turn had come, not started: this one goes first
            ticket._called.set()
        return ticket

    def hold(self, conversation: str, after: float) -> Callable[[], None]:
        """Keep the messages of `conversation` that arrived after `after` from taking their turn
        (replayed ones too) until the returned function is called; those that arrived up to
        `after` (the replays of the messages waited for) go on. Several holds of one
        conversation each keep back their own messages."""
        held = _Hold(after)
        self._holds.setdefault(conversation, []).append(held)

        def release() -> None:
            holds = self._holds.get(conversation, [])
            if held in holds:
                holds.remove(held)
                if not holds:
                    del self._holds[conversation]
            held.released.set()

        return release

    def waiting(self, conversation: str) -> int:
        """Tickets in `conversation`'s line, the one whose turn it is included."""
        return len(self._lines.get(conversation, ()))

    def refuse(self, ticket: Ticket) -> bool:
        """Note that `ticket`'s message is turned away (its line is too long); True
        for the first one since the line last accepted a message, so a flood gets
        one notice, not one per message."""
        line = self._lines[ticket.conversation]
        first, line.refusing = not line.refusing, True
        return first

    def accept(self, ticket: Ticket) -> None:
        """Note that `ticket`'s message is taken: the next refusal is noticed again."""
        self._lines[ticket.conversation].refusing = False

    def __len__(self) -> int:
        """Conversations with somebody in line."""
        return len(self._lines)

    def _ahead(self, ticket: Ticket) -> int:
        line = self._lines.get(ticket.conversation)
        if ticket.released or line is None:
            return 0
        return line.index(ticket)

    def _leave(self, ticket: Ticket) -> None:
        line = self._lines[ticket.conversation]
        first = line[0] is ticket
        line.remove(ticket)
        if not line:
            del self._lines[ticket.conversation]
        elif first:
            line[0]._called.set()


class RedisLocks:
    """A lock per conversation in Redis (redis-py's `Lock`: SET NX PX with a
    random token, released by a compare-and-delete script), so two replicas
    never interleave the turns of one conversation.

    The lock expires `lease` seconds after its last renewal; it is renewed every
    `lease / 3` while held, so a long generation keeps it and a crashed replica
    blocks the conversation for at most `lease`. Waiters poll every `poll`
    seconds. When Redis cannot be reached the reply goes on without the lock
    (logged, counted as `errors{kind="shared_lock"}`): history cannot be read or
    stored then either, so there is nothing to interleave, and refusing would
    stop every reply for the length of the outage.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "blenderchat:",
        lease: float = 30.0,
        poll: float = 0.05,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self.lease = lease
        self.poll = poll
        self._metrics = metrics

    def lock(self, conversation: str) -> ConversationLock:
        return _SharedLock(self, conversation)

    def _count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels("shared_lock").inc()


class _SharedLock(_Held):
    def __init__(self, locks: RedisLocks, conversation: str) -> None:
        self._locks = locks
        self._conversation = conversation
        self._lock: RedisLock | None = None
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        locks = self._locks
        lock = RedisLock(
            locks._client,
            f"{locks._prefix}lock:{self._conversation}",
            timeout=locks.lease,
            sleep=locks.poll,
            # The caller bounds the wait (the reply's deadline cancels us); one task owns this lock.
            blocking=True,
            thread_local=False,
        )
        token = uuid.uuid4().hex
        try:
            await lock.acquire(token=token)
        except asyncio.CancelledError:
            # The SET may have reached Redis just before the cancellation: if the lock
            # is ours, delete it now rather than leave the conversation blocked for a lease.
            await _delete_if_ours(lock, token)
            raise
        except RedisError as error:
            log.warning(
                "Redis unreachable, answering conversation %s without the shared lock: %s", self._conversation, error
            )
            locks._count_error()
            return
        self._lock = lock
        self._renewer = asyncio.create_task(self._renew(lock), name=f"renew-lock:{self._conversation}")

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            await lock.release()
        except LockError:
            log.warning("The shared lock of conversation %s had expired before it was released", self._conversation)
        except RedisError as error:
            # It expires by itself within a lease.
            log.warning("Could not release the shared lock of conversation %s: %s", self._conversation, error)
            self._locks._count_error()

    async def _renew(self, lock: RedisLock) -> None:
        while True:
            await asyncio.sleep(self._locks.lease / 3)
            try:
                await lock.reacquire()
            except LockError:
                log.warning("Lost the shared lock of conversation %s (it expired)", self._conversation)
                self._locks._count_error()
                return
            except RedisError as error:
                log.warning("Could not renew the shared lock of conversation %s: %s", self._conversation, error)


async def _delete_if_ours(lock: RedisLock, token: str) -> None:
    try:
        await lock.do_release(token.encode())
    except (LockError, RedisError):
        pass  # not ours, or Redis is away: either way it expires within a lease
