"""The reply engine every adapter talks to.

`await engine.reply(conversation, text)` loads the conversation's history,
queues it for the model and stores the finished exchange. One inference thread
runs the model; while it works, everything queued meanwhile waits, and the next
`generate` call takes all of it at once (dynamic batching), so many
conversations cost little more than one. Messages of one conversation are
answered one at a time, in order, each seeing the exchange before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from bot.config import Settings
from bot.errors import (
    EmptyMessage,
    EngineBusy,
    EngineClosed,
    GenerationFailed,
    MessageTooLong,
    ReplyError,
    ReplyTimeout,
)
from bot.memory import ConversationStore, Exchange
from bot.metrics import Metrics
from bot.model import Generated
from bot.text import clean_text

log = logging.getLogger(__name__)

# Shown when the model's answer is empty once control characters are removed.
NO_ANSWER = "Hmm, I'm not sure what to say to that."


class Generator(Protocol):
    """What the engine needs of a model: `bot.model.ChatModel` is one."""

    def generate(self, conversations: Sequence[Sequence[str]], *, sample: bool = False) -> list[Generated]: ...


@dataclass
class _Request:
    turns: list[str]
    sample: bool
    future: asyncio.Future[Generated] = field(repr=False)


class ReplyEngine:
    def __init__(
        self,
        model: Generator,
        store: ConversationStore,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._pending = 0  # replies accepted and not yet finished
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    # -- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> ReplyEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.store.open()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker = asyncio.create_task(self._batch_worker(), name="inference-batcher")

    @property
    def ready(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    def stop_accepting(self) -> None:
        """New replies are refused with `EngineClosed`; those in flight go on."""
        self._closing = True

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for replies in flight; True if all finished."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking replies, let those in flight finish, then stop the worker."""
        self.stop_accepting()
        await self.drain(self.settings.shutdown_grace if timeout is None else timeout)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        if self._executor is not None:
            # Do not wait for a generate still running past the deadline: its result is dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        await self.store.close()

    # -- the public API --------------------------------------------------

    async def reply(self, conversation: str, text: str, *, user: str | None = None, platform: str = "api") -> str:
        """The bot's answer to `text` in `conversation`; raises `ReplyError` subclasses
        for answers the user should get instead (busy, too long, timeout...)."""
        started = time.monotonic()
        try:
            answer = await self._reply(conversation, text)
        except ReplyError as error:
            self.metrics.replies.labels(platform, error.outcome).inc()
            raise
        self.metrics.replies.labels(platform, "ok").inc()
        self.metrics.reply_latency.labels(platform).observe(time.monotonic() - started)
        return answer

    async def reset(self, conversation: str) -> bool:
        """Forget a conversation; waits for a reply in flight in it to finish first."""
        async with self._conversation_lock(conversation):
            return await self.store.reset(conversation)

    async def history(self, conversation: str) -> list[Exchange]:
        return await self.store.history(conversation)

    # -- internals -------------------------------------------------------

    async def _reply(self, conversation: str, text: str) -> str:
        text = clean_text(text)
        if not text:
            raise EmptyMessage()
        if len(text) > self.settings.max_input_chars:
            raise MessageTooLong(len(text), self.settings.max_input_chars)
        if self._closing:
            raise EngineClosed()
        if self._pending >= self.settings.queue_size:
            raise EngineBusy()
        self._pending += 1
        self._idle.clear()
        self.metrics.queue_depth.inc()
        try:
            return await self._reply_in_order(conversation, text)
        finally:
            self._pending -= 1
            self.metrics.queue_depth.dec()
            if self._pending == 0:
                self._idle.set()

    async def _reply_in_order(self, conversation: str, text: str) -> str:
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        lock = self._conversation_lock(conversation)
        try:
            async with asyncio.timeout_at(deadline):
                await lock.acquire()
        except TimeoutError:
            raise ReplyTimeout() from None
        try:
            history = await self.store.history(conversation)
            try:
                async with asyncio.timeout_at(deadline):
                    generated = await self._generate(_turns(history, text))
            except TimeoutError:
                raise ReplyTimeout() from None
            # The answer exists now: it is stored and returned whatever the deadline says.
            await self._store_exchange(conversation, text, generated.text)
        finally:
            lock.release()
        return clean_text(generated.text) or NO_ANSWER

    async def _store_exchange(self, conversation: str, text: str, answer: str) -> None:
        try:
            await self.store.append_exchange(conversation, text, answer)
        except Exception:
            # The user still gets the answer; the conversation just does not remember it.
            log.exception("Could not store an exchange of conversation %s", conversation)
            self.metrics.errors.labels("memory_write").inc()

    async def _generate(self, turns: list[str], *, sample: bool = False) -> Generated:
        if self._worker is None:
            raise EngineClosed()
        future: asyncio.Future[Generated] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(turns, sample, future))
        return await future

    def _conversation_lock(self, conversation: str) -> _ConversationLock:
        return _ConversationLock(self, conversation)

    async def _batch_worker(self) -> None:
        loop = asyncio.get_running_loop()
        # Beam search multiplies a batch's rows by the beam count: cap conversations
        # so rows stay within batch_max_rows (see benchmarks/README.md).
        beams = getattr(self.model, "beams", 1)
        limit = max(1, min(self.settings.batch_size, self.settings.batch_max_rows // beams))
        while True:
            batch = [await self._queue.get()]
            if self.settings.batch_wait_ms:
                await asyncio.sleep(self.settings.batch_wait_ms / 1000)
            while len(batch) < limit and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [request for request in batch if not request.future.done()]  # drop timed-out ones
            for sample in (False, True):
                group = [request for request in live if request.sample is sample]
                if group:
                    await self._run_batch(loop, group, sample)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, group: list[_Request], sample: bool) -> None:
        self.metrics.batch_size.observe(len(group))
        try:
            results = await loop.run_in_executor(
                self._executor, lambda: self.model.generate([r.turns for r in group], sample=sample)
            )
        except Exception:
            log.exception("generate failed for a batch of %d", len(group))
            self.metrics.errors.labels("generation").inc()
            for request in group:
                if not request.future.done():
                    request.future.set_exception(GenerationFailed())
            return
        for request, result in zip(group, results):
            self.metrics.generated_tokens.inc(result.new_tokens)
            if not request.future.done():
                request.future.set_result(result)


def _turns(history: list[Exchange], text: str) -> list[str]:
    turns: list[str] = []
    for exchange in history:
        turns += [exchange.user, exchange.bot]
    turns.append(text)
    return turns


class _ConversationLock:
    """A FIFO lock per conversation, removed once nobody holds or waits for it,
    so the lock table stays as small as the set of active conversations."""

    def __init__(self, engine: ReplyEngine, conversation: str) -> None:
        self._engine = engine
        self._key = conversation

    async def acquire(self) -> None:
        engine = self._engine
        lock = engine._locks.setdefault(self._key, asyncio.Lock())
        engine._lock_users[self._key] = engine._lock_users.get(self._key, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._forget()
            raise

    def release(self) -> None:
        self._engine._locks[self._key].release()
        self._forget()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def _forget(self) -> None:
        engine = self._engine
        engine._lock_users[self._key] -= 1
        if engine._lock_users[self._key] == 0:
            del engine._lock_users[self._key]
            del engine._locks[self._key]
