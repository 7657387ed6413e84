"""The reply engine every adapter talks to.

`await engine.reply(conversation, text)` loads the conversation's history,
queues it for the model and stores the finished exchange. One inference thread
runs the model; while it works, everything queued meanwhile waits, and the next
`generate` call takes all of it at once (dynamic batching), so many
conversations cost little more than one.

Messages of one conversation are answered one at a time, in the order they
arrived, each seeing the exchange before it. The order is the order of
`engine.take_ticket(conversation)` calls, which adapters make first thing in
their event handlers, before any await; `reply(..., ticket=ticket)` waits for
that ticket's turn (bot/locks.py says how, and who releases what).

Around that: per-user rate limits (checked in line, so a slow limiter cannot
reorder messages), a cap on the messages waiting in one conversation, the
safety filter on the message and on the reply (an unsafe one is never sent nor
stored), mentions defused in every answer, and a periodic sweep that deletes
conversations idle past `MEMORY_TTL`.

`respond()` also says which stored exchange the answer is (its id), so that
people can rate it (`rate()`: kept with the conversation, counted in the metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bot.config import Settings
from bot.errors import (
    ConversationBusy,
    EmptyMessage,
    EngineBusy,
    EngineClosed,
    GenerationFailed,
    MessageTooLong,
    ReplyError,
    ReplyTimeout,
)
from bot.inflight import InFlight
from bot.locks import ConversationLines, ConversationLock, ConversationLocks, Ticket
from bot.memory import RATINGS, ConversationStore, Exchange, ExchangeRef, Feedback, StoreUnavailable, new_exchange_id
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

# Weight of the newest reply in the running estimate of how long one reply takes.
TURN_TIME_WEIGHT = 0.3

# Said instead of waiting for an answer that cannot come within REPLY_TIMEOUT.
TOO_SLOW = "I'm answering slowly right now and couldn't get to this in time. Please try again in a minute."


@dataclass(frozen=True)
class Reply:
    """An answer, and the stored exchange it is (None when nothing was stored: a
    deflection, or the memory was down): what a rating of the answer refers to.
    `at` is when that exchange was stored."""

    text: str
    exchange: ExchangeRef | None = None
    at: float | None = None


def shown_text(bot_text: str) -> str:
    """A stored reply as the engine gave it out (control characters gone, mentions defused)."""
    return neutralize_mentions(clean_text(bot_text) or NO_ANSWER)


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
        self._lines = ConversationLines()  # each conversation's messages, in arrival order
        # `shared_lock` (bot.locks.RedisLocks) keeps other replicas out of a conversation too.
        self._shared_lock = shared_lock
        self._turn_seconds = 0.0  # running estimate of one reply's time in line; 0 until measured
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

    def take_ticket(self, conversation: str) -> Ticket:
        """A place in `conversation`'s line, taken now, synchronously: call it before
        any await when a message arrives, pass it to `reply` (or `reset`), and
        release it when done with the message, whatever happens (bot/locks.py)."""
        return self._lines.take(conversation)

    async def reply(
        self,
        conversation: str,
        text: str,
        *,
        user: str | None = None,
        platform: str = "api",
        ticket: Ticket | None = None,
        exchange_id: str | None = None,
    ) -> str:
        """The bot's answer to `text` in `conversation`; raises `ReplyError` subclasses
        for answers the user should get instead (busy, too long, timeout...).

        `user` is who the rate limit counts; without one, the conversation.
        `ticket` (from `take_ticket`) is the message's place in line; without one
        a place is taken now and released on return. `exchange_id` names the
        stored exchange (default: a new id): if the conversation holds it already
        (a message answered, then replayed after a crash), its stored answer is
        given again, not generated and stored a second time."""
        reply = await self.respond(
            conversation, text, user=user, platform=platform, ticket=ticket, exchange_id=exchange_id
        )
        return reply.text

    async def respond(
        self,
        conversation: str,
        text: str,
        *,
        user: str | None = None,
        platform: str = "api",
        ticket: Ticket | None = None,
        exchange_id: str | None = None,
    ) -> Reply:
        """`reply()`, with the stored exchange the answer is (for ratings)."""
        started = time.monotonic()
        own_ticket = ticket is None
        if ticket is None:
            ticket = self.take_ticket(conversation)
        elif ticket.conversation != conversation:
            raise ValueError(f"a ticket of {ticket.conversation} cannot answer in {conversation}")
        try:
            answer, stored = await self._reply(ticket, text, user or conversation, exchange_id or new_exchange_id())
        except ReplyError as error:
            self.metrics.replies.labels(platform, error.outcome).inc()
            raise
        finally:
            if own_ticket:
                ticket.release()
        self.metrics.replies.labels(platform, "ok").inc()
        self.metrics.reply_latency.labels(platform).observe(time.monotonic() - started)
        if stored is None:
            return Reply(neutralize_mentions(answer))
        return Reply(neutralize_mentions(answer), ExchangeRef(conversation, stored.id), stored.at)

    async def rate(self, exchange: ExchangeRef, rating: str, *, user: str, platform: str) -> bool:
        """Record `user`'s rating (GOOD or BAD) of a reply; True if stored, False if
        that exchange is no longer remembered (or the user is blocked); raises
        `StoreUnavailable` if the memory cannot be written (already logged). Every
        rating of a user who is not blocked is counted in the metrics."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, not {rating!r}")
        if user in self.settings.blocked_users:
            return False
        self.metrics.feedback.labels(platform, rating).inc()
        try:
            stored = await self.store.add_feedback(Feedback(exchange, rating, user, platform, time.time()))
        except Exception as error:
            _log_store_error("Could not store a rating in conversation %s", exchange.conversation, error)
            self.metrics.errors.labels("memory_write").inc()
            raise StoreUnavailable("the rating could not be stored") from error
        log.info("A reply in conversation %s was rated %s (%s)", exchange.conversation, rating, platform)
        return stored

    async def reset(self, conversation: str, *, ticket: Ticket | None = None) -> bool:
        """Forget a conversation, in line: after the messages that came before, before those after."""
        own_ticket = ticket is None
        if ticket is None:
            ticket = self.take_ticket(conversation)
        try:
            await ticket.turn()
            async with self._conversation_lock(conversation):
                return await self.store.reset(conversation)
        finally:
            if own_ticket:
                ticket.release()

    async def history(self, conversation: str) -> list[Exchange]:
        return await self.store.history(conversation)

    # -- internals -------------------------------------------------------

    async def _reply(self, ticket: Ticket, text: str, user: str, exchange_id: str) -> tuple[str, Exchange | None]:
        text = clean_text(text)
        if not text:
            raise EmptyMessage()
        if len(text) > self.settings.max_input_chars:
            raise MessageTooLong(len(text), self.settings.max_input_chars)
        if self._closing:
            raise EngineClosed()
        if self._pending.count >= self.settings.queue_size:
            raise EngineBusy()
        self._refuse_a_long_wait(ticket)
        self.metrics.queue_depth.inc()
        try:
            with self._pending:
                return await self._reply_in_order(ticket, text, user, exchange_id)
        finally:
            self.metrics.queue_depth.dec()

    def _refuse_a_long_wait(self, ticket: Ticket) -> None:
        """Fail fast rather than hold a message that cannot be answered in time:
        a conversation with CONVERSATION_QUEUE_SIZE messages ahead, or whose
        expected wait (the messages ahead and this one, at the recent time per
        reply) is past REPLY_TIMEOUT."""
        ahead = ticket.ahead
        expected = (ahead + 1) * self._turn_seconds
        if ahead >= self.settings.conversation_queue_size:
            notify = self._lines.refuse(ticket)
            raise ConversationBusy(max(expected, 1.0), notify=notify)
        if expected > self.settings.reply_timeout:
            notify = self._lines.refuse(ticket)
            raise EngineBusy(TOO_SLOW, retry_after=expected, notify=notify)
        self._lines.accept(ticket)

    async def _reply_in_order(
        self, ticket: Ticket, text: str, user: str, exchange_id: str
    ) -> tuple[str, Exchange | None]:
        """The answer and the exchange stored for it (None if nothing was stored)."""
        conversation = ticket.conversation
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        lock = self._conversation_lock(conversation)
        try:
            async with asyncio.timeout_at(deadline):
                await ticket.turn()
                # In line, not before: a limiter that takes a while (a Redis round trip) would let messages overtake.
                await self.limiter.acquire(user)
                await lock.acquire()
        except TimeoutError:
            raise ReplyTimeout() from None
        held = time.monotonic()
        try:
            self._preparing += 1
            try:
                # Checked in line, not before: the check runs on a thread and would let messages overtake.
                if await self._unsafe(text, "input", conversation):
                    return self.settings.safety_deflection, None  # never shown to the model nor stored
                history = await self._load_history(conversation)
            finally:
                self._preparing -= 1  # from here to the queue there is no await
            answered = next((exchange for exchange in history if exchange.id == exchange_id), None)
            if answered is not None:
                # Answered before (by a process that died before delivering it): the same answer again.
                return clean_text(answered.bot) or NO_ANSWER, answered
            try:
                async with asyncio.timeout_at(deadline):
                    generated = await self._generate_safely(_turns(history, text), conversation)
            except TimeoutError:
                raise ReplyTimeout() from None
            if generated is None:
                return self.settings.safety_deflection, None
            # The answer exists now: it is stored and returned whatever the deadline says.
            stored = await self._store_exchange(conversation, text, generated.text, exchange_id)
        finally:
            await lock.release()
        self._measure_turn(time.monotonic() - held)
        return clean_text(generated.text) or NO_ANSWER, stored

    def _measure_turn(self, seconds: float) -> None:
        if self._turn_seconds == 0.0:
            self._turn_seconds = seconds
        else:
            self._turn_seconds += TURN_TIME_WEIGHT * (seconds - self._turn_seconds)

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

    async def _store_exchange(self, conversation: str, text: str, answer: str, exchange_id: str) -> Exchange | None:
        try:
            return await self.store.append_exchange(conversation, text, answer, exchange_id=exchange_id)
        except Exception as error:
            # The user still gets the answer; the conversation just does not remember it.
            _log_store_error("Could not store an exchange of conversation %s", conversation, error)
            self.metrics.errors.labels("memory_write").inc()
            return None

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
        """The lock other replicas respect; nothing to take without one (the ticket orders this process)."""
        if self._shared_lock is None:
            return _NO_LOCK
        return self._shared_lock.lock(conversation)

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


class _NoLock:
    async def acquire(self) -> None:
        pass

    async def release(self) -> None:
        pass

    async def __aenter__(self) -> None:
        pass

    async def __aexit__(self, *exc_info: object) -> None:
        pass


_NO_LOCK = _NoLock()


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

