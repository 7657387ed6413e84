"""The Slack adapter: slack_bolt's AsyncApp in Socket Mode or HTTP mode.

Answers mentions in channels and messages in DMs (and, optionally, follow-ups
in threads it already answered, known from the thread's conversation memory,
so every replica and a restarted bot know them too), once per user message, in
a thread by default; a message with a file is answered for its text. Each
event takes its place in its conversation's line first thing (before the
de-duplication and name lookups await), and keeps it until its answer is
posted, so a conversation's answers go out in the order its messages came.
Translation only: Slack event -> IncomingMessage -> engine -> text. The AI-app
surface around it (thinking status, suggested prompts, Home tab, feedback
buttons) is adapters/slack_surface.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import RetryState
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.web.async_client import AsyncWebClient

from adapters.base import (
    IncomingMessage,
    NotDelivered,
    ReplyTasks,
    answer_once,
    forget,
    is_reset,
    respond,
    split_message,
)
from adapters.dedupe import DedupeStore, InProcessDedupe
from adapters.slack_surface import NETWORK_ERRORS, SlackSurface
from adapters.slack_text import mentioned_users, to_model_text, to_slack_text
from bot.config import Settings
from bot.engine import Reply, ReplyEngine
from bot.inbox import Claim, Entry, Inbox
from bot.locks import Ticket

log = logging.getLogger(__name__)

# How long an answer waits for Slack to be reachable again, holding its conversation's place,
# before it is left to the inbox (which posts it later, perhaps after newer answers).
DELIVERY_PATIENCE = 60.0

EVENTS_PATH = "/slack/events"
# Slack truncates at 40,000 and advises far less per message; a section block (the last
# chunk, which carries the feedback buttons) holds 3,000.
MAX_CHUNK = 3000
RESET_DONE = "Okay, I've forgotten our conversation here. Let's start over!"
FILE_ONLY = "I can't look at files or images, I only read text. Tell me in words what it is about and I'll answer!"
# Marks each posted chunk with the message it answers, so a replay after a crash can tell what is out already.
REPLY_EVENT = "blenderchat_reply"
NAME_TTL = 3600.0
MAX_NAMES = 5_000
CONNECT_TIMEOUT = 30.0
# Message subtypes that are a user talking: a message with a file, a thread reply also sent to the channel.
# The rest (edits, deletions, joins, bot messages...) are not answered.
ANSWERED_SUBTYPES = frozenset({"file_share", "thread_broadcast"})
# Web API errors that mean our token is gone for good: the app was uninstalled or the token revoked.
TOKEN_GONE = frozenset({"invalid_auth", "token_revoked", "token_expired", "account_inactive", "not_authed"})


class SlackStartError(RuntimeError):
    """Slack could not be reached or refused our tokens: `str()` says which and why."""


@dataclass(frozen=True)
class _Turn:
    """One user message we will answer, and where the answer goes."""

    conversation: str
    user: str
    raw_text: str  # as Slack sent it, tokens and all
    channel: str
    ts: str  # the user's message, for the progress reaction
    thread_ts: str | None  # where to reply; None: in the channel itself
    has_files: bool = False  # the message carries files (their content is not read)
    followup: bool = False  # a channel message in a thread: answered only if the bot is in that thread
    in_dm: bool = False


class SlackAdapter:
    name = "slack"

    def __init__(
        self, settings: Settings, engine: ReplyEngine, dedupe: DedupeStore | None = None, inbox: Inbox | None = None
    ) -> None:
        if not settings.slack_bot_token:
            raise ValueError("SlackAdapter needs SLACK_BOT_TOKEN")
        if not settings.slack_app_token and not settings.slack_signing_secret:
            raise ValueError("SlackAdapter needs SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode)")
        self.settings = settings
        self.engine = engine
        self.dedupe = dedupe or InProcessDedupe()  # who was greeted already
        # Each event is claimed and recorded before Slack gets its ack (bot/inbox): a retry is
        # answered only if the first handler died, and a crash loses nothing.
        self.inbox = inbox or Inbox.in_process(settings, engine.metrics)
        self.socket_mode = bool(settings.slack_app_token)
        # slack_sdk tries a call again once when its connection drops; not a post, which Slack may have
        # made already (only its answer was lost): `_post_part` checks what is there before trying again.
        self.client = AsyncWebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url,
                                     retry_handlers=[_ConnectionErrorRetryExceptPosts()])  # fmt: skip
        self.client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=3))
        self.app = AsyncApp(
            client=self.client,
            # Passed explicitly: Bolt would otherwise read SLACK_SIGNING_SECRET itself.
            signing_secret=settings.slack_signing_secret or "",
            logger=_bolt_logger(),
        )
        self.app.middleware(self._refuse_when_stopping)
        # A listener middleware runs before Bolt acks the event (the listener itself may run after).
        self.app.event("app_mention", middleware=[self._take_in])(_acknowledge)
        self.app.event("message", middleware=[self._take_in])(_acknowledge)
        self._tasks = ReplyTasks()
        self.surface = SlackSurface(
            settings, engine, self.client, spawn=lambda work: self._tasks.spawn(work, name="slack-surface"),
            greeted=dedupe,
        )
        self.surface.register(self.app)
        self._socket: Any = None  # AsyncSocketModeHandler; it needs a running loop to be built
        self._bot_user_id: str | None = None
        self._names: OrderedDict[str, tuple[str, float]] = OrderedDict()  # user -> (name, expiry)
        self._lookups: dict[str, asyncio.Future[str | None]] = {}  # users.info calls in flight
        self._started = False
        self._closed = False
        self._failure: str | None = None

    # -- lifecycle -------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        """HTTP mode: serve Slack's event requests at POST /slack/events on `app`.

        Nothing in Socket Mode: there is no signing secret to check requests
        with, so the endpoint would let anyone post events."""
        if not self.socket_mode:
            app.router.add_post(EVENTS_PATH, self._handle_http)

    async def start(self) -> None:
        try:
            auth = await self.client.auth_test()
        except SlackApiError as error:
            raise SlackStartError(f"Slack refused SLACK_BOT_TOKEN: {error.response.get('error')}") from None
        except NETWORK_ERRORS as error:
            raise SlackStartError(f"Cannot reach Slack at {self.settings.slack_api_url}: {error}") from None
        self._bot_user_id = auth.get("user_id")
        if self.socket_mode:
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            try:
                # Asked here rather than by the handler, which would retry a refused token forever.
                opened = await self.client.apps_connections_open(app_token=self.settings.slack_app_token)
            except SlackApiError as error:
                raise SlackStartError(f"Slack refused SLACK_APP_TOKEN: {error.response.get('error')}") from None
            except NETWORK_ERRORS as error:
                raise SlackStartError(f"Cannot reach Slack at {self.settings.slack_api_url}: {error}") from None
            self._socket = AsyncSocketModeHandler(self.app, self.settings.slack_app_token, web_client=self.client)
            self._socket.client.wss_uri = opened["url"]
            try:
                # The client retries a failed connection forever; start-up must not wait forever.
                await asyncio.wait_for(self._socket.connect_async(), CONNECT_TIMEOUT)
            except TimeoutError:
                await self._socket.close_async()
                raise SlackStartError(
                    f"No Socket Mode connection within {CONNECT_TIMEOUT:g}s: check SLACK_APP_TOKEN "
                    "(an xapp- token with connections:write) and that Socket Mode is enabled"
                ) from None
        self._started = True
        log.info("Slack connected as %s (%s mode)", auth.get("user"), "Socket" if self.socket_mode else "HTTP")

    @property
    def connected(self) -> bool:
        if not self._started or self._closed:
            return False
        if self._socket is None:
            return True  # HTTP mode: Slack calls us, reachable once started
        session = self._socket.client.current_session
        return session is not None and not session.closed

    @property
    def failure(self) -> str | None:
        """Why Slack is unusable for good (our token was revoked), for /healthz; else None."""
        return self._failure

    def stop_accepting(self) -> None:
        self._tasks.stop()

    async def drain(self, timeout: float) -> bool:
        return await self._tasks.drain(timeout)

    async def close(self) -> None:
        self._closed = True
        self._tasks.stop()
        if self._socket is not None:
            await self._socket.close_async()

    # -- intake ----------------------------------------------------------

    async def _handle_http(self, request: web.Request) -> web.Response:
        # Bolt answers 500 to a timestamp that is not a number; it is a bad request, not our bug.
        timestamp = request.headers.get("X-Slack-Request-Timestamp")
        if timestamp is not None:
            try:
                int(timestamp)
            except ValueError:
                return web.json_response({"error": "invalid request"}, status=401)
        response = await self.app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(response)

    async def _refuse_when_stopping(self, next: Callable[[], Awaitable[BoltResponse]]) -> BoltResponse | None:
        # Not acking while shutting down makes Slack deliver the event again later
        # (to another connection or after the restart) instead of losing it.
        if not self._tasks.accepting:
            return BoltResponse(status=503, body="shutting down")
        return await next()

    async def _take_in(
        self, body: dict[str, Any], event: dict[str, Any], next: Callable[[], Awaitable[None]]
    ) -> None:
        """Take a message in, before Slack is acked: its place in line, then its claim and
        inbox entry (one write), then its answer in a task of its own."""
        turn = self._turn_for(body, event)
        if turn is not None:
            # Its place in the conversation's line before anything here awaits, so the claim,
            # however long it takes, cannot let a later message of it overtake this one.
            ticket = self.engine.take_ticket(turn.conversation)
            task = None
            try:
                # One claim per user message: Slack retries an event with the same message, and a
                # mention can also arrive as a `message` event with the same channel and ts.
                claim = await self.inbox.accept(_entry(body, turn))
                if claim is not None:
                    work = answer_once(self.inbox, claim, self._reply(turn, ticket, claim))
                    task = self._tasks.spawn(work, name=f"slack-reply-{turn.channel}-{turn.ts}", ticket=ticket)
            finally:
                if task is None:
                    ticket.release()
        await next()

    def replay(self, claim: Claim) -> None:
        """Answer a message a stopped process left unanswered, in the conversation's line;
        the parts of its answer already in Slack are not posted again."""
        entry = claim.entry
        turn = _Turn(conversation=entry.conversation, user=entry.user, raw_text=entry.text, **entry.route)
        ticket = self.engine.take_ticket(turn.conversation)
        work = answer_once(self.inbox, claim, self._reply(turn, ticket, claim))
        self._tasks.spawn(work, name=f"slack-replay-{turn.channel}-{turn.ts}", ticket=ticket)

    def _status_for(self, turn: _Turn) -> AsyncSetStatus | None:
        """Where the thinking status goes: Bolt's set_status (made as Bolt makes it for the
        event, so a replay clears the one a stopped process left up) for a DM or the thread
        the answer goes to; None for a reply in the channel itself, which gets the hourglass."""
        thread = turn.thread_ts or turn.ts  # Bolt's: the message's thread, else the message
        if turn.in_dm or thread == turn.thread_ts:
            return AsyncSetStatus(client=self.client, channel_id=turn.channel, thread_ts=thread)
        return None

    async def _in_thread(self, turn: _Turn, ticket: Ticket) -> bool:
        """The bot answered in this thread if it remembers the thread's conversation: the
        memory is shared by replicas and survives restarts (and a `reset` ends following).
        Asked in line, once the thread's earlier messages are answered and stored, so a
        follow-up sent while the bot is still answering the mention counts too."""
        await ticket.turn()
        try:
            return bool(await self.engine.history(turn.conversation))
        except Exception as error:  # the store is down: stay quiet rather than answer every thread message
            log.warning("Could not tell whether the bot is in thread %s of %s: %s", turn.thread_ts, turn.channel, error)
            return False

    def _turn_for(self, body: dict[str, Any], event: dict[str, Any]) -> _Turn | None:
        """The turn to answer for this event, or None if it is not for us."""
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not (user and channel and ts):
            return None
        # Edits, deletions, bot posts, joins...: only what users say is answered.
        subtype = event.get("subtype")
        if (subtype and subtype not in ANSWERED_SUBTYPES) or event.get("bot_id") or user == self._bot_user_id:
            return None
        if user in self.settings.blocked_users:
            return None  # silence, not even the progress reaction; and no `forget` of a shared thread
        team = body.get("team_id") or event.get("team") or "-"
        if self.settings.slack_team_ids and team not in self.settings.slack_team_ids:
            return None
        is_dm = event.get("channel_type") == "im" or channel.startswith("D")
        if not is_dm and self.settings.slack_channel_ids and channel not in self.settings.slack_channel_ids:
            return None
        thread = event.get("thread_ts")
        followup = event.get("type") == "message" and not is_dm
        if followup and not (self.settings.slack_thread_followups and thread):
            return None  # channel messages reach us only as thread follow-ups (message.channels scope)
        if is_dm:
            conversation, reply_to = f"slack:{team}:{channel}", thread
        elif self.settings.slack_reply_in_thread:
            reply_to = thread or ts
            conversation = f"slack:{team}:{channel}:{reply_to}"
        else:
            conversation, reply_to = f"slack:{team}:{channel}", thread
        has_files = subtype == "file_share" or bool(event.get("files"))
        return _Turn(
            conversation, user, event.get("text") or "", channel, ts, reply_to,
            has_files=has_files, followup=followup, in_dm=is_dm,
        )

    # -- answering -------------------------------------------------------

    async def _reply(self, turn: _Turn, ticket: Ticket, claim: Claim) -> None:
        if turn.followup and not await self._in_thread(turn, ticket):
            return  # chatter in a thread the bot is not in: not even the thinking status
        # The hint goes up at once, even while an earlier message of the conversation is being answered.
        hint = asyncio.create_task(self.surface.thinking.show(turn.channel, turn.ts, self._status_for(turn)))
        try:
            # The ticket is held until the answer is posted: answers go out in the order the
            # messages came, even when posting an earlier one waits out a rate limit.
            with ticket:
                reply = await self._answer(turn, ticket, claim.entry.exchange_id)
                if reply and reply.text:
                    await self._post(turn, reply, claim)
        finally:
            await self.surface.thinking.clear(await hint)

    async def _answer(self, turn: _Turn, ticket: Ticket, exchange_id: str) -> Reply | None:
        names = await self._names_for(mentioned_users(turn.raw_text))
        model_text = to_model_text(turn.raw_text, bot_user_id=self._bot_user_id, names=names)
        if is_reset(model_text):
            return Reply(await forget(self.engine, turn.conversation, RESET_DONE, ticket))
        if turn.has_files and not model_text.strip():
            return Reply(FILE_ONLY)  # nothing but a file (or a mention and a file): say why there is no answer
        message = IncomingMessage("slack", turn.conversation, turn.user, model_text)
        return await respond(self.engine, message, ticket, exchange_id=exchange_id)

    async def _post(self, turn: _Turn, reply: Reply, claim: Claim) -> None:
        """Post the answer's chunks in order, the last with the feedback buttons of a stored
        exchange. A part that cannot reach Slack is tried again (`_post_part`); a reply that
        arrived broken means Slack had the message: go on. Each chunk carries the message's
        exchange id and its part number as message metadata; a replayed message first reads
        which parts Slack has already (posted before a crash) and posts only the others."""
        chunks = _chunks(reply.text)
        marker = claim.entry.exchange_id
        posted = await self._parts_posted(turn, marker) if claim.replayed else set()
        if posted:
            self.inbox.count_duplicate("slack")
            log.info("%d parts of an answer in %s were posted before a restart: not posting them again",
                     len(posted), turn.channel)  # fmt: skip
        for index, chunk in enumerate(chunks):
            if index in posted:
                continue
            blocks = self.surface.reply_blocks(chunk, reply.exchange) if index == len(chunks) - 1 else None
            metadata = {"event_type": REPLY_EVENT, "event_payload": {"answers": marker, "part": index}}
            if not await self._post_part(turn, chunk, blocks, metadata):
                return

    async def _post_part(self, turn: _Turn, chunk: str, blocks: Any, metadata: dict[str, Any]) -> bool:
        """Post one part of an answer; False if Slack refused it (nothing more can go there).
        While Slack cannot be reached, try again, holding the conversation's place (its later
        answers cannot go out either), each time first reading whether the last try got
        through after all; after DELIVERY_PATIENCE, NotDelivered: the inbox posts it later."""
        loop = asyncio.get_running_loop()
        deadline, pause, warned = loop.time() + DELIVERY_PATIENCE, 0.5, False
        part = metadata["event_payload"]["part"]
        while True:
            try:
                await self.client.chat_postMessage(
                    channel=turn.channel, thread_ts=turn.thread_ts, text=chunk, blocks=blocks, link_names=False,
                    metadata=metadata,
                )
                return True
            except SlackApiError as error:
                self._note_api_error(error)
                log.warning("Could not post a reply in %s: %s", turn.channel, error.response.get("error"))
                return False
            except aiohttp.ClientPayloadError as error:
                log.warning("Slack's answer to a reply in %s came broken (%s); going on", turn.channel, error)
                return True
            except NETWORK_ERRORS as error:
                reason = f"Could not post a reply in {turn.channel}: {type(error).__name__}: {error}"
                if loop.time() + pause > deadline:
                    raise NotDelivered(reason) from error  # not lost: the inbox posts it later
                if not warned:
                    log.warning("%s; trying again for up to %gs", reason, DELIVERY_PATIENCE)
                    warned = True
            await asyncio.sleep(pause)
            pause = min(2 * pause, 8.0)
            try:
                if part in await self._parts_posted(turn, metadata["event_payload"]["answers"]):
                    return True  # the last try reached Slack; only its answer was lost
            except NotDelivered:
                continue  # still unreachable

    async def _parts_posted(self, turn: _Turn, marker: str) -> set[int]:
        """Which parts of the answer marked `marker` Slack already has, read from the thread
        (or the channel after the user's message). Nothing, with a warning, if Slack refuses
        the read (the app lacks the history scope of that kind of channel): then the answer
        is posted, at the risk of a second copy. NotDelivered if Slack cannot be reached."""
        try:
            if turn.thread_ts:
                response = await self.client.conversations_replies(
                    channel=turn.channel, ts=turn.thread_ts, include_all_metadata=True, limit=200
                )
            else:
                response = await self.client.conversations_history(
                    channel=turn.channel, oldest=turn.ts, include_all_metadata=True, limit=200
                )
        except SlackApiError as error:
            log.warning("Could not read %s to see whether an answer was posted already (%s); posting it",
                        turn.channel, error.response.get("error"))  # fmt: skip
            return set()
        except NETWORK_ERRORS as error:
            # Posting blind now could post a second copy, and Slack is hardly reachable: later.
            raise NotDelivered(
                f"Could not read {turn.channel} to see whether an answer was posted before ({type(error).__name__})"
            ) from error
        parts = set()
        for message in response.get("messages") or []:
            metadata = message.get("metadata") or {}
            payload = metadata.get("event_payload") or {}
            if metadata.get("event_type") == REPLY_EVENT and payload.get("answers") == marker:
                parts.add(int(payload.get("part", 0)))
        return parts

    def _note_api_error(self, error: SlackApiError) -> None:
        code = error.response.get("error")
        if code in TOKEN_GONE and self._failure is None:
            self._failure = f"Slack refused SLACK_BOT_TOKEN after start-up ({code}): reinstall the app or replace it"
            log.error("%s; /healthz fails from now on, so the bot gets restarted", self._failure)

    async def _names_for(self, users: set[str]) -> dict[str, str]:
        users.discard(self._bot_user_id or "")
        return {user: name for user in users if (name := await self._name_of(user))}

    async def _name_of(self, user: str) -> str | None:
        """A user's display name from users.info, cached for a while; None if unknown."""
        cached = self._names.get(user)
        if cached is not None and cached[1] > asyncio.get_running_loop().time():
            self._names.move_to_end(user)
            return cached[0]
        # Messages arriving together that mention the same person share one lookup.
        lookup = self._lookups.get(user)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up_name(user))
            self._lookups[user] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(user, None))
        return await asyncio.shield(lookup)

    async def _look_up_name(self, user: str) -> str | None:
        try:
            response = await self.client.users_info(user=user)
        except NETWORK_ERRORS as error:
            log.debug("users.info failed for %s: %s", user, error)
            return None
        info = response.get("user") or {}
        profile = info.get("profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or info.get("real_name") or info.get("name")
        if not name:
            return None
        self._names[user] = (name, asyncio.get_running_loop().time() + NAME_TTL)
        self._names.move_to_end(user)
        while len(self._names) > MAX_NAMES:
            self._names.popitem(last=False)
        return name


async def _acknowledge() -> None:
    """The events' listener: `_take_in`, its middleware, did the work; Bolt acks."""


def _entry(body: dict[str, Any], turn: _Turn) -> Entry:
    """The inbox entry of a turn: the turn itself, keyed by the user's message."""
    team = body.get("team_id") or "-"
    route = {name: getattr(turn, name) for name in ("channel", "ts", "thread_ts", "has_files", "followup", "in_dm")}
    return Entry(
        key=f"slack:{team}:{turn.channel}:{turn.ts}", platform="slack", conversation=turn.conversation,
        user=turn.user, text=turn.raw_text, route=route,
    )  # fmt: skip


class _ConnectionErrorRetryExceptPosts(AsyncConnectionErrorRetryHandler):
    """slack_sdk's retry of a call whose connection dropped, for every method but chat.postMessage."""

    async def _can_retry_async(
        self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:  # fmt: skip
        if request.url.rstrip("/").endswith("/chat.postMessage"):
            return False
        return await super()._can_retry_async(state=state, request=request, response=response, error=error)


def _bolt_logger() -> logging.Logger:
    """The base logger Bolt copies into each of its own loggers (level, filters).

    Bolt logs rejected requests with their body at INFO, and the body is user
    text: below DEBUG, Bolt only gets to say warnings and errors.
    """
    bolt_log = log.getChild("bolt")
    bolt_log.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    if not bolt_log.filters:
        bolt_log.addFilter(_ExpectedBoltWarnings())
    return bolt_log


class _ExpectedBoltWarnings(logging.Filter):
    """Bolt reads SLACK_BOT_TOKEN from the environment by itself, then warns that the
    client we pass (same token, our base URL and retry handlers) wins: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


def _chunks(text: str) -> list[str]:
    """`text` escaped for Slack, in ordered chunks of at most MAX_CHUNK characters."""
    chunks = []
    for piece in split_message(text, MAX_CHUNK):
        escaped = to_slack_text(piece)
        if len(escaped) > MAX_CHUNK:
            # Escaping grows a character to at most 5 (`&` -> `&amp;`), so this always fits.
            chunks += [to_slack_text(small) for small in split_message(piece, MAX_CHUNK // 5)]
        else:
            chunks.append(escaped)
    return chunks
