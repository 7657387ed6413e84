"""The reply engine every adapter talks to.

`await engine.reply(conversation, text)` loads the conversation's history,
queues it for the model and stores the finished exchange. The model runs on
inference threads, one `generate` call per runtime worker at a time (two on
CTranslate2, which splits each batch between them; one on transformers);
while they work, everything queued meanwhile waits, and the next call takes
all of it at once (dynamic batching), so many conversations cost little more
than one. A worker left free starts on the next message at once, beside the
batch running on the other.

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

`retry()` is "try again", the one way every surface does it: another answer to
the message of the conversation's latest exchange, sampled (beam search would
give the same one again), safety-checked, stored in that exchange's place under
a new id (a rating belongs to the answer rated: the old answer's ratings stay
with the old id and are not moved). It waits its turn in the conversation's line
and counts against the user's rate limit like a message.

Each channel has settings of its own, kept in the memory's store so every replica
shares them (`channel_settings`, `set_persona`, `set_listening`, `reset_settings`):
a message answered with `channel=` gets that channel's persona in place of PERSONA.
A channel is what the people running it control: a Discord channel (a thread
counts as its parent channel), a Slack channel, a DM, a web or terminal
conversation; the adapters name it. A message the bot only overheard in a
listening channel (`listened=True`) also takes a token of the channel's own rate
limit, and is left unanswered, silently, when either limit says no.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from bot.chat_model import ChatModel, Generated
from bot.config import Settings
from bot.errors import (
    AnswerGone,
    ConversationBusy,
    EmptyMessage,
    EngineBusy,
    EngineClosed,
    GenerationFailed,
    MemoryUnavailable,
    MessageTooLong,
    NoOtherAnswer,
    NotLatest,
    PersonaRefused,
    RateLimited,
    ReplyError,
    ReplyTimeout,
)
from bot.inflight import InFlight
from bot.locks import ConversationLines, ConversationLock, ConversationLocks, Ticket
from bot.memory import (
    LISTEN,
    PERSONA,
    RATINGS,
    ChannelSettings,
    ConversationStore,
    Exchange,
    ExchangeRef,
    Feedback,
    StoreUnavailable,
    new_exchange_id,
)
from bot.metrics import Metrics
from bot.prompt import PersonaTooLong, persona_lines
from bot.ratelimit import RateLimiter, TokenBucketLimiter
from bot.safety import SafetyFilter
from bot.text import clean_text, neutralize_mentions

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Shown when the model's answer is empty once control characters are removed.
NO_ANSWER = "Hmm, I'm not sure what to say to that."

# How often idle conversations are swept (more often when MEMORY_TTL is shorter).
SWEEP_INTERVAL = 3600.0

# Weight of the newest reply in the running estimate of how long one reply takes.
TURN_TIME_WEIGHT = 0.3

# Sampled answers tried by `retry()` for one that is safe and differs from the answer it replaces.
RETRY_SAMPLES = 2

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


@dataclass(frozen=True)
class _Asked:
    """Who asked, and where: what answering a message needs besides its text."""

    user: str  # whose rate limit counts
    exchange_id: str
    channel: str | None  # whose settings apply; None: the defaults
    listened: bool  # overheard in a listening channel, not addressed to the bot


@dataclass
class _Request:
    turns: list[str]
    persona: tuple[str, ...]
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
        # Not `limiter or ...`: a TokenBucketLimiter holding no buckets yet has len() 0, so it is falsy.
        self.limiter = limiter if limiter is not None else TokenBucketLimiter.from_settings(settings)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        self._lines = ConversationLines()  # each conversation's messages, in arrival order
        # `shared_lock` (bot.locks.RedisLocks) keeps other replicas out of a conversation too.
        self._shared_lock = shared_lock
        self._turn_seconds = 0.0  # running estimate of one reply's time in line; 0 until measured
        self._sweeper: asyncio.Task[None] | None = None
        self._pending = InFlight()  # replies accepted and not yet finished
        # Tickets of messages not yet queued for the model: those whose turn has come are on their way
        # (see `_on_the_way`). Weak: a ticket an adapter dropped without a reply leaves by itself.
        self._arriving: weakref.WeakSet[Ticket] = weakref.WeakSet()
        self._closing = False
        self._forget_hooks: list[Callable[[str, float], Awaitable[None]]] = []

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
        # One generate call per runtime worker: a second call on CTranslate2 runs beside the
        # first on the worker it leaves idle; transformers has one worker using every core.
        self._workers = max(1, int(getattr(self.model, "workers", 1)))
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="inference")
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

    def take_ticket(self, conversation: str, *, arrived: float | None = None) -> Ticket:
        """A place in `conversation`'s line, taken now, synchronously: call it before
        any await when a message arrives, pass it to `reply` (or `reset`), and
        release it when done with the message, whatever happens (bot/locks.py).
        `arrived`: when a replayed message arrived (its place is by that time)."""
        ticket = self._lines.take(conversation, arrived)
        self._arriving.add(ticket)
        return ticket

    def hold_line(self, conversation: str, after: float) -> Callable[[], None]:
        """Keep the messages of `conversation` that arrived after `after` from their turn until
        the returned function is called, while older messages of it wait elsewhere (bot/locks.py)."""
        return self._lines.hold(conversation, after)

    def on_forget(self, hook: Callable[[str, float], Awaitable[None]]) -> None:
        """Also `await hook(conversation, since)` when a conversation is forgotten, `since`
        being when the reset arrived (the inbox drops that conversation's waiting messages)."""
        self._forget_hooks.append(hook)

    async def reply(
        self,
        conversation: str,
        text: str,
        *,
        user: str | None = None,
        platform: str = "api",
        ticket: Ticket | None = None,
        exchange_id: str | None = None,
        channel: str | None = None,
        listened: bool = False,
    ) -> str:
        """The bot's answer to `text` in `conversation`; raises `ReplyError` subclasses
        for answers the user should get instead (busy, too long, timeout...).

        `user` is who the rate limit counts; without one, the conversation.
        `channel` is whose settings apply (its persona; without one, PERSONA);
        `listened` says the message was not addressed to the bot, which answers it
        because the channel listens (see the module's docstring).
        `ticket` (from `take_ticket`) is the message's place in line; without one
        a place is taken now and released on return. `exchange_id` names the
        stored exchange (default: a new id): if the conversation holds it already
        (a message answered, then replayed after a crash), its stored answer is
        given again, not generated and stored a second time."""
        reply = await self.respond(
            conversation, text, user=user, platform=platform, ticket=ticket, exchange_id=exchange_id,
            channel=channel, listened=listened,
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
        channel: str | None = None,
        listened: bool = False,
    ) -> Reply:
        """`reply()`, with the stored exchange the answer is (for ratings)."""
        started = time.monotonic()
        own_ticket = ticket is None
        if ticket is None:
            ticket = self.take_ticket(conversation)
        elif ticket.conversation != conversation:
            raise ValueError(f"a ticket of {ticket.conversation} cannot answer in {conversation}")
        try:
            asked = _Asked(user or conversation, exchange_id or new_exchange_id(), channel, listened)
            answer, stored = await self._reply(ticket, text, asked)
        except ReplyError as error:
            self.metrics.replies.labels(platform, error.outcome).inc()
            raise
        finally:
            self._arriving.discard(ticket)  # refused or failed before the queue: not coming
            if own_ticket:
                ticket.release()
        self.metrics.replies.labels(platform, "ok").inc()
        self.metrics.reply_latency.labels(platform).observe(time.monotonic() - started)
        if stored is None:
            return Reply(neutralize_mentions(answer))
        return Reply(neutralize_mentions(answer), ExchangeRef(conversation, stored.id), stored.at)

    async def admits(self, user: str, text: str) -> bool:
        """Whether a message from `user` at least as long as `text` would get past the
        checks that refuse it now (its length, the user's rate limit), taking nothing: for
        an adapter with costly work to do before `respond` (name lookups). Blocked users
        are the adapters' to drop before this."""
        if len(clean_text(text)) > self.settings.max_input_chars:
            return False
        return await self.limiter.admits(user)

    async def retry(
        self,
        conversation: str,
        exchange_id: str,
        *,
        user: str | None = None,
        platform: str = "api",
        ticket: Ticket | None = None,
        channel: str | None = None,
    ) -> Reply:
        """"Try again": a new, sampled answer to the message of `exchange_id`, which must
        be the conversation's latest exchange; it replaces that exchange's answer in
        memory, in its place, under a new id (the Reply's `exchange`), and the caller
        shows it in place of the old one. Raises `NotLatest` for an older answer,
        `AnswerGone` for one no longer remembered, `NoOtherAnswer` when no safe,
        different answer came, and the `ReplyError`s of a message (rate limit, busy,
        timeout...): each with a `user_message` to show, the old answer kept.
        `user`, `ticket` and `channel` (whose persona) as for `reply()`."""
        own_ticket = ticket is None
        if ticket is None:
            ticket = self.take_ticket(conversation)
        elif ticket.conversation != conversation:
            raise ValueError(f"a ticket of {ticket.conversation} cannot answer in {conversation}")
        try:
            asked = _Asked(user or conversation, exchange_id, channel, listened=False)
            stored = await self._admitted(ticket, lambda: self._retry_in_order(ticket, asked))
        except ReplyError as error:
            self.metrics.retries.labels(platform, error.outcome).inc()
            raise
        finally:
            self._arriving.discard(ticket)  # refused or failed before the queue: not coming
            if own_ticket:
                ticket.release()
        self.metrics.retries.labels(platform, "ok").inc()
        log.info("An answer in conversation %s was redone (%s)", conversation, platform)
        return Reply(shown_text(stored.bot), ExchangeRef(conversation, stored.id), stored.at)

    async def rate(self, exchange: ExchangeRef, rating: str, *, user: str, platform: str) -> bool:
        """Record `user`'s rating (GOOD or BAD) of a reply, replacing that user's
        earlier rating of it; True if stored, False if that exchange is no longer
        remembered (or the user is blocked); raises `StoreUnavailable` if the memory
        cannot be written (already logged). Only stored ratings are counted in the
        metrics, so they agree with what `GET /api/feedback` reports."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, not {rating!r}")
        if user in self.settings.blocked_users:
            return False
        try:
            stored = await self.store.add_feedback(Feedback(exchange, rating, user, platform, time.time()))
        except Exception as error:
            _log_store_error("Could not store a rating in conversation %s", exchange.conversation, error)
            self.metrics.errors.labels("memory_write").inc()
            raise StoreUnavailable("the rating could not be stored") from error
        if stored:
            self.metrics.feedback.labels(platform, rating).inc()
            log.info("A reply in conversation %s was rated %s (%s)", exchange.conversation, rating, platform)
        return stored

    async def reset(self, conversation: str, *, ticket: Ticket | None = None, with_settings: bool = False) -> bool:
        """Forget a conversation, in line: after the messages that came before, before those after.
        `with_settings`: a person forgetting their own DM (or web, terminal) conversation, whose
        channel settings are kept under the conversation's own key: those go too."""
        own_ticket = ticket is None
        if ticket is None:
            ticket = self.take_ticket(conversation)
        self._arriving.discard(ticket)  # a reset never reaches the model
        try:
            await ticket.turn()
            async with self._conversation_lock(conversation):
                # As of when the reset arrived: an answer to a message that came before is not stored after it.
                forgotten = await self.store.reset(conversation, at=ticket.arrived)
                if with_settings:
                    forgotten = await self.store.reset_channel_settings(conversation) or forgotten
            for hook in self._forget_hooks:
                try:
                    await hook(conversation, ticket.arrived)
                except Exception:
                    log.exception("Could not finish forgetting conversation %s", conversation)
            return forgotten
        finally:
            if own_ticket:
                ticket.release()

    async def history(self, conversation: str) -> list[Exchange]:
        return await self.store.history(conversation)

    async def check_persona(self, text: str) -> tuple[str, ...]:
        """The facts of a persona written as text (`|` or newlines between them), if the
        bot may take it: safe, and short enough to leave the conversation half the
        model's window. Raises `PersonaRefused` saying what to change."""
        persona = persona_lines(clean_text(text))
        if not persona:
            raise PersonaRefused("A persona needs at least one line, e.g. 'I love hiking | I have a dog'.")
        try:
            self.model.check_persona(persona)
        except PersonaTooLong as error:
            raise PersonaRefused(str(error)) from None
        if any(await asyncio.gather(*(self._unsafe(line, "persona", "-") for line in persona))):
            raise PersonaRefused("That persona did not pass the safety filter; nothing was changed.")
        return persona

    # -- channel settings ------------------------------------------------------
    # Each raises StoreUnavailable (logged here) when the memory cannot be used.

    async def channel_settings(self, channel: str) -> ChannelSettings:
        """`channel`'s own settings (defaults for what was never set)."""
        values = await self._settings_call("read", channel, self.store.channel_settings(channel))
        return ChannelSettings.from_values(values)

    async def set_persona(self, channel: str, text: str) -> tuple[str, ...]:
        """Give `channel` the persona written in `text`, once `check_persona` accepts it
        (else `PersonaRefused`, and nothing is stored); the persona's lines."""
        persona = await self.check_persona(text)
        await self._settings_call(
            "write", channel, self.store.set_channel_setting(channel, PERSONA, "\n".join(persona))
        )
        log.info("Channel %s has a persona of its own now (%d lines)", channel, len(persona))
        return persona

    async def set_listening(self, channel: str, on: bool) -> None:
        """Whether the bot answers every message in `channel`, or only those addressed to it."""
        await self._settings_call(
            "write", channel, self.store.set_channel_setting(channel, LISTEN, "on" if on else "off")
        )
        log.info("Channel %s: listening %s", channel, "on" if on else "off")

    async def reset_settings(self, channel: str) -> bool:
        """`channel` back to the defaults (PERSONA, not listening); True if it had settings."""
        return await self._settings_call("write", channel, self.store.reset_channel_settings(channel))

    async def listening(self, channel: str) -> bool:
        """Whether `channel` listens; False when that cannot be read (the bot stays quiet)."""
        try:
            return (await self.channel_settings(channel)).listen
        except StoreUnavailable:
            return False

    async def _settings_call(self, kind: str, channel: str, call: Awaitable[_T]) -> _T:
        """`call` (a store's read or write of `channel`'s settings), its failure logged and counted."""
        try:
            return await call
        except Exception as error:
            _log_store_error(f"Could not {kind} the settings of channel %s", channel, error)
            self.metrics.errors.labels(f"memory_{kind}").inc()
            done = "read" if kind == "read" else "written"
            raise StoreUnavailable(f"the settings of {channel} could not be {done}") from error

    async def _persona_for(self, channel: str | None) -> tuple[str, ...]:
        """The persona a message in `channel` is answered with: the channel's own, else PERSONA
        (also when the settings cannot be read: the answer matters more than the character)."""
        if channel is None:
            return self.settings.persona
        try:
            own = (await self.channel_settings(channel)).persona
        except StoreUnavailable:
            return self.settings.persona
        return own or self.settings.persona

    # -- internals -------------------------------------------------------

    async def _reply(self, ticket: Ticket, text: str, asked: _Asked) -> tuple[str, Exchange | None]:
        text = clean_text(text)
        if not text:
            raise EmptyMessage()
        if len(text) > self.settings.max_input_chars:
            raise MessageTooLong(len(text), self.settings.max_input_chars)
        return await self._admitted(ticket, lambda: self._reply_in_order(ticket, text, asked))

    async def _admitted(self, ticket: Ticket, work: Callable[[], Awaitable[_T]]) -> _T:
        """`work()` (a message's or a retry's turn), if the engine takes it now: refused
        while closing, when the queue is full, or when the wait would be too long."""
        if self._closing:
            raise EngineClosed()
        if self._pending.count >= self.settings.queue_size:
            raise EngineBusy()
        self._refuse_a_long_wait(ticket)
        self.metrics.queue_depth.inc()
        try:
            with self._pending:
                return await work()
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

    async def _in_turn(self, ticket: Ticket, asked: _Asked) -> tuple[float, ConversationLock]:
        """Wait for the message's turn in line, its rate limits and the conversation's shared
        lock (held on return), within REPLY_TIMEOUT: the deadline, and the lock to release."""
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        lock = self._conversation_lock(ticket.conversation)
        try:
            async with asyncio.timeout_at(deadline):
                await ticket.turn()
                # In line, not before: a limiter that takes a while (a Redis round trip) would let messages overtake.
                await self._admit(asked)
                await lock.acquire()
        except TimeoutError:
            raise ReplyTimeout() from None
        return deadline, lock

    async def _reply_in_order(self, ticket: Ticket, text: str, asked: _Asked) -> tuple[str, Exchange | None]:
        """The answer and the exchange stored for it (None if nothing was stored)."""
        conversation = ticket.conversation
        deadline, lock = await self._in_turn(ticket, asked)
        held = time.monotonic()
        try:
            try:
                # Checked in line, not before: the check runs on a thread and would let messages overtake.
                if await self._unsafe(text, "input", conversation):
                    return self.settings.safety_deflection, None  # never shown to the model nor stored
                history = await self._load_history(conversation)
                persona = await self._persona_for(asked.channel)
            finally:
                self._arriving.discard(ticket)  # from here to the queue there is no await
            answered = next((exchange for exchange in history if exchange.id == asked.exchange_id), None)
            if answered is not None:
                # Answered before (by a process that died before delivering it): the same answer again.
                return clean_text(answered.bot) or NO_ANSWER, answered
            try:
                async with asyncio.timeout_at(deadline):
                    generated = await self._generate_safely(_turns(history, text), persona, conversation)
            except TimeoutError:
                raise ReplyTimeout() from None
            if generated is None:
                return self.settings.safety_deflection, None
            # The answer exists now: it is stored and returned whatever the deadline says.
            stored = await self._store_exchange(conversation, text, generated.text, asked.exchange_id, ticket.arrived)
        finally:
            await lock.release()
        self._measure_turn(time.monotonic() - held)
        return clean_text(generated.text) or NO_ANSWER, stored

    async def _retry_in_order(self, ticket: Ticket, asked: _Asked) -> Exchange:
        """The exchange `asked.exchange_id` with a new answer, stored in its place."""
        exchange_id = asked.exchange_id
        conversation = ticket.conversation
        deadline, lock = await self._in_turn(ticket, asked)
        held = time.monotonic()
        try:
            try:
                history = await self.store.history(conversation)
            except Exception as error:
                # Without the history there is no telling which answer is the latest.
                _log_store_error("Could not read the history of conversation %s", conversation, error)
                self.metrics.errors.labels("memory_read").inc()
                raise MemoryUnavailable() from None
            place = next((index for index, exchange in enumerate(history) if exchange.id == exchange_id), None)
            if place is None:
                raise AnswerGone()
            if place != len(history) - 1:
                raise NotLatest()
            latest = history[place]
            self._arriving.discard(ticket)  # its sampled request goes to the queue now
            try:
                async with asyncio.timeout_at(deadline):
                    persona = await self._persona_for(asked.channel)
                    generated = await self._sample_another(
                        _turns(history[:place], latest.user), persona, conversation, latest.bot
                    )
            except TimeoutError:
                raise ReplyTimeout() from None
            try:
                stored = await self.store.replace_exchange(
                    conversation, exchange_id, generated.text, new_id=new_exchange_id()
                )
            except Exception as error:
                _log_store_error("Could not store a redone answer in conversation %s", conversation, error)
                self.metrics.errors.labels("memory_write").inc()
                raise MemoryUnavailable() from None
            if stored is None:
                raise AnswerGone()  # forgotten meanwhile by another replica without shared locks
        finally:
            await lock.release()
        self._measure_turn(time.monotonic() - held)
        return stored

    async def _sample_another(
        self, turns: list[str], persona: tuple[str, ...], conversation: str, old: str
    ) -> Generated:
        """A sampled answer that passes the safety filter and is not the old answer again."""
        for _ in range(RETRY_SAMPLES):
            generated = await self._generate(turns, persona, sample=True)
            text = clean_text(generated.text)
            if await self._unsafe(text, "output", conversation):
                continue
            if (text or NO_ANSWER) != (clean_text(old) or NO_ANSWER):
                return generated
        raise NoOtherAnswer()

    async def _admit(self, asked: _Asked) -> None:
        """The rate limits: the user's, and for a message overheard in a listening channel the
        channel's too. Over them, an overheard message gets silence: nobody asked the bot."""
        try:
            # The channel's first: a message it refuses costs the person nothing.
            if asked.listened and asked.channel is not None:
                await self.limiter.acquire(f"channel:{asked.channel}")
            await self.limiter.acquire(asked.user)
        except RateLimited as error:
            if asked.listened:
                raise RateLimited(error.retry_after, notify=False) from None
            raise

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

    async def _generate_safely(
        self, turns: list[str], persona: tuple[str, ...], conversation: str
    ) -> Generated | None:
        """A reply that passes the safety filter: the usual decoding, else one
        sampled retry; None if that is unsafe too."""
        generated = await self._generate(turns, persona)
        if await self._unsafe(clean_text(generated.text), "output", conversation):
            generated = await self._generate(turns, persona, sample=True)
            if await self._unsafe(clean_text(generated.text), "output", conversation):
                return None
        return generated

    async def _unsafe(self, text: str, direction: str, conversation: str) -> bool:
        if self.safety is None or not await self.safety.check(text):
            return False
        self.metrics.safety_blocked.labels(direction).inc()
        log.info("Safety filter blocked an %s message in conversation %s", direction, conversation)
        return True

    async def _store_exchange(
        self, conversation: str, text: str, answer: str, exchange_id: str, asked_at: float
    ) -> Exchange | None:
        try:
            stored = await self.store.append_exchange(
                conversation, text, answer, exchange_id=exchange_id, asked_at=asked_at
            )
        except Exception as error:
            # The user still gets the answer; the conversation just does not remember it.
            _log_store_error("Could not store an exchange of conversation %s", conversation, error)
            self.metrics.errors.labels("memory_write").inc()
            return None
        if stored is None:
            log.info("Not storing an answer in conversation %s: it was forgotten after the message came", conversation)
        return stored

    async def _generate(self, turns: list[str], persona: tuple[str, ...], *, sample: bool = False) -> Generated:
        if self._worker is None:
            raise EngineClosed()
        future: asyncio.Future[Generated] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(turns, persona, sample, future))
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

    def _on_the_way(self) -> int:
        """Messages accepted whose turn has come (their ticket is first in its
        conversation's line) and that are not yet queued for the model: checked,
        rate-limited, recorded in an inbox, or reading their history. A message
        behind another of its conversation is not: it waits for that one's reply."""
        return sum(1 for ticket in list(self._arriving) if not ticket.released and ticket.ahead == 0)

    async def _batch_worker(self) -> None:
        loop = asyncio.get_running_loop()
        # Beam search multiplies a batch's rows by the beam count: cap conversations
        # so rows stay within batch_max_rows (see benchmarks/README.md).
        beams = getattr(self.model, "beams", 1)
        limit = max(1, min(self.settings.batch_size, self.settings.batch_max_rows // beams))
        free = asyncio.Semaphore(self._workers)  # runtime workers without a generate call
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await free.acquire()
                try:
                    batch = [await self._queue.get()]
                except BaseException:
                    free.release()
                    raise
                # Messages that arrived together (a burst) reach the queue a few ms apart, after
                # their safety check, inbox record and history read: wait for those already on
                # their way, at most batch_wait_ms, so one generate answers them all. A lone
                # message never waits.
                gather_until = loop.time() + self.settings.batch_wait_ms / 1000
                while len(batch) < limit:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    elif loop.time() < gather_until and self._on_the_way():
                        await asyncio.sleep(0.001)
                    else:
                        break
                live = [request for request in batch if not request.future.done()]  # drop timed-out ones
                task = asyncio.create_task(self._run_batches(loop, live), name="inference-batch")
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: free.release())
        finally:
            for task in running:
                task.cancel()

    async def _run_batches(self, loop: asyncio.AbstractEventLoop, live: list[_Request]) -> None:
        for sample in (False, True):
            group = [request for request in live if request.sample is sample]
            if group:
                await self._run_batch(loop, group, sample)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, group: list[_Request], sample: bool) -> None:
        self.metrics.batch_size.observe(len(group))
        try:
            results = await loop.run_in_executor(
                self._executor,
                lambda: self.model.generate([r.turns for r in group], sample=sample, personas=[r.persona for r in group]),
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

