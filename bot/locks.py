"""Per-conversation locks: the messages of one conversation are answered one at
a time, each seeing the exchange before it.

`LocalLocks` orders them within this process (first come, first served).
`RedisLocks` also keeps other replicas out of the conversation while a reply is
read, generated and stored. `LayeredLocks(local, shared)` takes the local lock
first, so a replica asks Redis for at most one lock per conversation at a time
and its own messages keep their arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
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


class LocalLocks:
    """A FIFO lock per conversation, removed once nobody holds or waits for it,
    so the table stays as small as the set of active conversations."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def lock(self, conversation: str) -> ConversationLock:
        return _LocalLock(self, conversation)


class _LocalLock(_Held):
    def __init__(self, locks: LocalLocks, conversation: str) -> None:
        self._table = locks
        self._key = conversation

    async def acquire(self) -> None:
        table = self._table
        lock = table._locks.setdefault(self._key, asyncio.Lock())
        table._users[self._key] = table._users.get(self._key, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._forget()
            raise

    async def release(self) -> None:
        self._table._locks[self._key].release()
        self._forget()

    def _forget(self) -> None:
        table = self._table
        table._users[self._key] -= 1
        if table._users[self._key] == 0:
            del table._users[self._key]
            del table._locks[self._key]


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


class LayeredLocks:
    """This process's lock, then the shared one; released in reverse order."""

    def __init__(self, local: ConversationLocks, shared: ConversationLocks) -> None:
        self.local = local
        self.shared = shared

    def lock(self, conversation: str) -> ConversationLock:
        return _LayeredLock(self.local.lock(conversation), self.shared.lock(conversation))


class _LayeredLock(_Held):
    def __init__(self, outer: ConversationLock, inner: ConversationLock) -> None:
        self._outer = outer
        self._inner = inner

    async def acquire(self) -> None:
        await self._outer.acquire()
        try:
            await self._inner.acquire()
        except BaseException:
            await self._outer.release()
            raise

    async def release(self) -> None:
        try:
            await self._inner.release()
        finally:
            await self._outer.release()
