"""The reply engine every adapter talks to.

`await engine.reply(conversation, text)` loads the conversation's history,
queues it for the model and stores the finished exchange. One inference thread
runs the model; while it works, everything queued meanwhile waits, and the next
`generate` call takes all of it at once (dynamic batching), so many
conversations cost little more than one. Messages of one conversation are
answered one at a time, in order, each seeing the exchange before it.

Around that: per-user rate limits, the safety filter on the message and on the
reply (an unsafe one is never sent nor stored), mentions defused in every
answer, and a periodic sweep that deletes conversations idle past `MEMORY_TTL`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
from bot.inflight import InFlight
from bot.locks import ConversationLock, ConversationLocks, LayeredLocks, LocalLocks
from bot.memory import ConversationStore, Exchange, StoreUnavailable
from bot.metrics import Metrics
from bot.model import ChatModel, Generated
from bot.ratelimit import RateLimiter, TokenBucketLimiter
from bot.safety import SafetyFilter
from bot.text import clean_text, neutralize_mentions

log = logging.getLogger(__name__)

# Shown when the model's answer is empty once control characters are removed.
NO_ANSWER = "Hmm, I'm not sure what to say to that."

# How often idle conversations are swept (more often when MEMORY_TTL is shorter).
SWEEP_INTERVAL = 3600.0


@dataclass
class _Request:
    turns: list[str]
    sample: bool
    future: asyncio.Future[Generated] = field(repr=False)


class ReplyEngine:
    def __init__(
        self,
        model: ChatModel,
        store: ConversationStore,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        shared_lock: ConversationLocks | None = None,
        safety: SafetyFilter | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.safety = safety  # None: built from settings by start()
        self.limiter = limiter or TokenBucketLimiter.from_settings(settings)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        # `shared_lock` (bot.locks.RedisLocks) keeps other replicas out of a conversation too.
        self._locks: ConversationLocks = LocalLocks()
        if shared_lock is not None:
            self._locks = LayeredLocks(self._locks, shared_lock)
        self._sweeper: asyncio.Task[None] | None = None
        self._pending = InFlight()  # replies accepted and not yet finished
        self._preparing = 0  # replies holding their conversation's lock, not yet queued for the model
        self._closing = False

    # -- lifecycle -------------------------------------------------------

    async def __aenter__(self) -> ReplyEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self.safety is None:
            self.safety = await asyncio.to_thread(SafetyFilter.from_settings, self.settings)
        await self.store.open()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker = asyncio.create_task(self._batch_worker(), name="inference-batcher")
        if self.settings.memory_ttl > 0:
            self._sweeper = asyncio.create_task(self._sweep_idle_conversations(), name="memory-sweeper")

    @property
    def ready(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    def stop_accepting(self) -> None:
        """New replies are refused with `EngineClosed`; those in flight go on."""
        self._closing = True

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for replies in flight; True if all finished."""
        return await self._pending.wait(timeout)

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking replies, let those in flight finish, then stop the worker."""
        self.stop_accepting()
        await self.drain(self.settings.shutdown_grace if timeout is None else timeout)
        for task in (self._worker, self._sweeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._worker = self._sweeper = None
        if self._executor is not None:
            # Do not wait for a generate still running past the deadline: its result is dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        await self.store.close()

    # -- the public API --------------------------------------------------

    async def reply(self, conversation: str, text: str, *, user: str | None = None, platform: str = "api") -> str:
        """The bot's answer to `text` in `conversation`; raises `ReplyError` subclasses
        for answers the user should get instead (busy, too long, timeout...).
        `user` is who the rate limit counts; without one, the conversation."""
        started = time.monotonic()
        try:
            await self.limiter.acquire(user or conversation)
            answer = await self._reply(conversation, text)
        except ReplyError as error:
            self.metrics.replies.labels(platform, error.outcome).inc()
            raise
        self.metrics.replies.labels(platform, "ok").inc()
        self.metrics.reply_latency.labels(platform).observe(time.monotonic() - started)
        return neutralize_mentions(answer)

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
        if self._pending.count >= self.settings.queue_size:
            raise EngineBusy()
        self.metrics.queue_depth.inc()
        try:
            with self._pending:
                return await self._reply_in_order(conversation, text)
        finally:
            self.metrics.queue_depth.dec()

    async def _reply_in_order(self, conversation: str, text: str) -> str:
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        lock = self._conversation_lock(conversation)
        try:
            async with asyncio.timeout_at(deadline):
                await lock.acquire()
        except TimeoutError:
            raise ReplyTimeout() from None
        try:
            self._preparing += 1
            try:
                # Checked in line, not before: the check runs on a thread and would let messages overtake.
                if await self._unsafe(text, "input", conversation):
                    return self.settings.safety_deflection  # never shown to the model nor stored
                history = await self._load_history(conversation)
            finally:
                self._preparing -= 1  # from here to the queue there is no await
            try:
                async with asyncio.timeout_at(deadline):
                    generated = await self._generate_safely(_turns(history, text), conversation)
            except TimeoutError:
                raise ReplyTimeout() from None
            if generated is None:
                return self.settings.safety_deflection
            # The answer exists now: it is stored and returned whatever the deadline says.
            await self._store_exchange(conversation, text, generated.text)
        finally:
            await lock.release()
        return clean_text(generated.text) or NO_ANSWER

    async def _load_history(self, conversation: str) -> list[Exchange]:
        try:
            return await self.store.history(conversation)
        except Exception as error:
            # Memory is down (Redis restarting...): answer without context rather than not at all.
            _log_store_error("Could not read the history of conversation %s", conversation, error)
            self.metrics.errors.labels("memory_read").inc()
            return []

    async def _generate_safely(self, turns: list[str], conversation: str) -> Generated | None:
        """A reply that passes the safety filter: the usual decoding, else one
        sampled retry; None if that is unsafe too."""
        generated = await self._generate(turns)
        if await self._unsafe(clean_text(generated.text), "output", conversation):
            generated = await self._generate(turns, sample=True)
            if await self._unsafe(clean_text(generated.text), "output", conversation):
                return None
        return generated

    async def _unsafe(self, text: str, direction: str, conversation: str) -> bool:
        if self.safety is None or not await self.safety.check(text):
            return False
        self.metrics.safety_blocked.labels(direction).inc()
        log.info("Safety filter blocked an %s message in conversation %s", direction, conversation)
        return True

    async def _store_exchange(self, conversation: str, text: str, answer: str) -> None:
        try:
            await self.store.append_exchange(conversation, text, answer)
        except Exception as error:
            # The user still gets the answer; the conversation just does not remember it.
            _log_store_error("Could not store an exchange of conversation %s", conversation, error)
            self.metrics.errors.labels("memory_write").inc()

    async def _generate(self, turns: list[str], *, sample: bool = False) -> Generated:
        if self._worker is None:
            raise EngineClosed()
        future: asyncio.Future[Generated] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(turns, sample, future))
        return await future

    async def _sweep_idle_conversations(self) -> None:
        """Delete conversations idle longer than MEMORY_TTL: now, then periodically."""
        ttl = self.settings.memory_ttl
        while True:
            try:
                deleted = await self.store.sweep(ttl)
            except Exception:
                log.exception("Could not sweep idle conversations")
                self.metrics.errors.labels("memory_sweep").inc()
            else:
                if deleted:
                    log.info("Deleted %d conversations idle for more than %gs", deleted, ttl)
            await asyncio.sleep(min(SWEEP_INTERVAL, ttl))

    def _conversation_lock(self, conversation: str) -> ConversationLock:
        return self._locks.lock(conversation)

    async def _batch_worker(self) -> None:
        loop = asyncio.get_running_loop()
        # Beam search multiplies a batch's rows by the beam count: cap conversations
        # so rows stay within batch_max_rows (see benchmarks/README.md).
        beams = getattr(self.model, "beams", 1)
        limit = max(1, min(self.settings.batch_size, self.settings.batch_max_rows // beams))
        while True:
            batch = [await self._queue.get()]
            # Messages that arrived together (a burst) reach the queue a few ms apart, after
            # their safety check and history read: wait for those already on their way, at most
            # batch_wait_ms, so one generate answers them all. A lone message never waits.
            gather_until = loop.time() + self.settings.batch_wait_ms / 1000
            while len(batch) < limit:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                elif self._preparing and loop.time() < gather_until:
                    await asyncio.sleep(0.001)
                else:
                    break
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


def _log_store_error(message: str, conversation: str, error: Exception) -> None:
    """An unreachable store (an outage, already counted) is one line per message;
    anything else may be a bug and gets its traceback."""
    if isinstance(error, StoreUnavailable):
        log.warning(message + ": %s", conversation, error)
    else:
        log.exception(message, conversation)


def _turns(history: list[Exchange], text: str) -> list[str]:
    turns: list[str] = []
    for exchange in history:
        turns += [exchange.user, exchange.bot]
    turns.append(text)
    return turns

