"""The Slack adapter: slack_bolt's AsyncApp in Socket Mode or HTTP mode.

Answers mentions in channels and messages in DMs (and, optionally, follow-ups
in threads it already answered, known from the thread's conversation memory,
so every replica and a restarted bot know them too), once per user message, in
a thread: a DM's in the thread of the user's message (Slack's agent messaging
experience), a channel's by default; a message with a file is answered for its text. Each
event takes its place in its conversation's line first thing (before the
de-duplication and name lookups await), and keeps it until its answer is
posted, so a conversation's answers go out in the order its messages came.
Translation only: Slack event -> IncomingMessage -> engine -> text. The AI-app
surface around it (thinking status, suggested prompts, Home tab, feedback
buttons) is adapters/slack_surface.py; the `/blenderbot` command (a channel's
persona and listening) adapters/slack_commands.py.

A channel's settings (`slack:<team>:<channel>`, for all its threads) give its
answers their persona. In a channel set to listen, every message (the
`message.channels` / `message.groups` events) is answered, except those that
mention someone else or everyone: whether a channel listens is asked of the
engine when such a message comes, before it is recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
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
    ReplyTasks,
    Undelivered,
    answer_once,
    forget,
    is_reset,
    respond,
    split_message,
)
from adapters.dedupe import DedupeStore, InProcessDedupe
from adapters.slack_commands import SlackSettingsCommand
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
NAME_TTL = 3600.0  # how long a display name (or the lack of one: an unknown user) is kept
MAX_NAMES = 5_000
# users.info calls one message may cost (made at once); the other users it mentions read as "someone".
MAX_LOOKUPS = 10
CONNECT_TIMEOUT = 30.0
# Message subtypes that are a user talking: a message with a file, a thread reply also sent to the channel.
# The rest (edits, deletions, joins, bot messages...) are not answered.
ANSWERED_SUBTYPES = frozenset({"file_share", "thread_broadcast"})
# Web API errors that say nothing about what was asked: asked again next time, not remembered.
PASSING_ERRORS = frozenset({"ratelimited", "internal_error", "fatal_error", "request_timeout", "service_unavailable"})
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
    overheard: bool = False  # a channel message said to nobody in particular: answered if the channel listens
    listened: bool = False  # answered because the channel listens

    @property
    def settings_key(self) -> str:
        """Whose settings apply: the channel's (`slack:<team>:<channel>`), or the DM's."""
        return ":".join(self.conversation.split(":")[:3])


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
        SlackSettingsCommand(
            settings, engine, self.client, spawn=lambda work: self._tasks.spawn(work, name="slack-command")
        ).register(self.app)
        self._socket: Any = None  # AsyncSocketModeHandler; it needs a running loop to be built
        self._bot_user_id: str | None = None
        self._names: OrderedDict[str, tuple[str | None, float]] = OrderedDict()  # user -> (name or None, expiry)
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
                # A channel message said to nobody in particular: for the bot only if the channel listens.
                taken = await self._heard(turn) if turn.overheard else turn
                # One claim per user message: Slack retries an event with the same message, and a
                # mention can also arrive as a `message` event with the same channel and ts.
                claim = await self.inbox.accept(_entry(body, taken)) if taken is not None else None
                if taken is not None and claim is not None:
                    work = answer_once(self.inbox, claim, self._reply(taken, ticket, claim))
                    task = self._tasks.spawn(work, name=f"slack-reply-{taken.channel}-{taken.ts}", ticket=ticket)
            finally:
                if task is None:
                    ticket.release()
        await next()

    async def _heard(self, turn: _Turn) -> _Turn | None:
        """A channel message said to nobody in particular: answered as heard if the channel listens,
        else as a thread follow-up if it is one (still to check), else not at all."""
        if await self.engine.listening(turn.settings_key):
            return replace(turn, followup=False, overheard=False, listened=True)
        return turn if turn.followup else None

    def replay(self, claim: Claim) -> None:
        """Answer a message a stopped process left unanswered, in the conversation's line;
        the parts of its answer already in Slack are not posted again."""
        entry = claim.entry
        turn = _Turn(conversation=entry.conversation, user=entry.user, raw_text=entry.text, **entry.route)
        ticket = self.engine.take_ticket(turn.conversation, arrived=entry.arrived)  # ahead of later messages
        work = answer_once(self.inbox, claim, self._reply(turn, ticket, claim))
        self._tasks.spawn(work, name=f"slack-replay-{turn.channel}-{turn.ts}", ticket=ticket)

    def _status_for(self, turn: _Turn) -> AsyncSetStatus | None:
        """Where the thinking status goes: Bolt's set_status on the thread the answer goes to
        (a DM's answer too), so the answer clears it; a replay makes the same one and clears
        what a stopped process left up. None for an answer in the channel itself: no thread
        to show a status in, so the hourglass."""
        if turn.thread_ts is None:
            return None
        return AsyncSetStatus(client=self.client, channel_id=turn.channel, thread_ts=turn.thread_ts)

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
        in_channel = event.get("type") == "message" and not is_dm  # the message.channels / .groups events
        text = event.get("text") or ""
        if in_channel and self._bot_user_id in mentioned_users(text):
            # Slack sends this message as an `app_mention` too, with the same key: that one is
            # answered. Claimed here, the message would be dropped (a follow-up of a thread the
            # bot is not in, or overheard), and its claim would make the mention a duplicate.
            log.debug("A message in %s mentions the bot: left to its app_mention", channel)
            return None
        followup = in_channel and self.settings.slack_thread_followups and bool(thread)
        overheard = in_channel and not _said_to_others(text)
        if in_channel and not (followup or overheard):
            return None
        if is_dm:
            # Slack's agent experience shows a DM as threads, the user's message the root of each
            # (its samples answer at `thread_ts or ts`): the answer goes in that thread, one memory per DM.
            conversation, reply_to = f"slack:{team}:{channel}", thread or ts
        elif self.settings.slack_reply_in_thread:
            reply_to = thread or ts
            conversation = f"slack:{team}:{channel}:{reply_to}"
        else:
            conversation, reply_to = f"slack:{team}:{channel}", thread
        has_files = subtype == "file_share" or bool(event.get("files"))
        return _Turn(
            conversation, user, text, channel, ts, reply_to,
            has_files=has_files, followup=followup, in_dm=is_dm, overheard=overheard,
        )

    # -- answering -------------------------------------------------------

    async def _reply(self, turn: _Turn, ticket: Ticket, claim: Claim) -> None:
        if turn.followup and not await self._in_thread(turn, ticket):
            # Chatter in a thread the bot is not in: not even the thinking status.
            log.debug("Not answering a message in thread %s of %s: the bot is not in that thread",
                      turn.thread_ts, turn.channel)  # fmt: skip
            return
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
        names = await self._names_for(turn)
        model_text = to_model_text(turn.raw_text, bot_user_id=self._bot_user_id, names=names)
        if is_reset(model_text) and not turn.listened:
            # Forgetting a DM forgets its settings (its persona) too: the person's own data.
            return Reply(await forget(self.engine, turn.conversation, RESET_DONE, ticket, dm=turn.in_dm))
        if turn.has_files and not model_text.strip():
            if turn.listened:
                return None  # a file shared in a listening channel: nobody asked the bot about it
            return Reply(FILE_ONLY)  # nothing but a file (or a mention and a file): say why there is no answer
        message = IncomingMessage(
            "slack", turn.conversation, turn.user, model_text, channel=turn.settings_key, listened=turn.listened
        )
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
        through after all; after DELIVERY_PATIENCE, Undelivered: the inbox posts it later."""
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
                    raise Undelivered(reason) from error  # not lost: the inbox posts it later
                if not warned:
                    log.warning("%s; trying again for up to %gs", reason, DELIVERY_PATIENCE)
                    warned = True
            await asyncio.sleep(pause)
            pause = min(2 * pause, 8.0)
            try:
                if part in await self._parts_posted(turn, metadata["event_payload"]["answers"]):
                    return True  # the last try reached Slack; only its answer was lost
            except Undelivered:
                continue  # still unreachable

    async def _parts_posted(self, turn: _Turn, marker: str) -> set[int]:
        """Which parts of the answer marked `marker` Slack already has, read from the thread
        (or the channel after the user's message). Nothing, with a warning, if Slack refuses
        the read (the app lacks the history scope of that kind of channel): then the answer
        is posted, at the risk of a second copy. Undelivered if Slack cannot be reached."""
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
            raise Undelivered(
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

    async def _names_for(self, turn: _Turn) -> dict[str, str]:
        """The display names of the users `turn` mentions. Names known (or known to be
        unknown) cost nothing; of the others, the first MAX_LOOKUPS are looked up at once,
        and none if the message will be refused anyway (too long, its author over the
        rate limit): those read as "someone"."""
        users = sorted(mentioned_users(turn.raw_text) - {self._bot_user_id}, key=lambda u: turn.raw_text.find(u))
        if not users:
            return {}
        # The shortest the text can be once the names are in (a name has a character at least).
        shortest = to_model_text(turn.raw_text, bot_user_id=self._bot_user_id, names=dict.fromkeys(users, "?"))
        now = asyncio.get_running_loop().time()
        names = {user: cached[0] for user in users if (cached := self._names.get(user)) and cached[1] > now}
        for user in names:
            self._names.move_to_end(user)
        missing = [user for user in users if user not in names]
        if missing and not await self.engine.admits(turn.user, shortest):
            missing = []  # the engine refuses it: no names needed for that
        if len(missing) > MAX_LOOKUPS:
            log.info("A message in %s mentions %d users whose names are not known: looking up %d of them",
                     turn.channel, len(missing), MAX_LOOKUPS)  # fmt: skip
            missing = missing[:MAX_LOOKUPS]
        found = await asyncio.gather(*(self._name_of(user) for user in missing))
        names.update(zip(missing, found))
        return {user: name for user, name in names.items() if name}

    async def _name_of(self, user: str) -> str | None:
        """A user's display name from users.info, kept for a while; None if unknown."""
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
        except SlackApiError as error:
            log.debug("users.info refused %s: %s", user, error.response.get("error"))
            if error.response.get("error") in PASSING_ERRORS:
                return None
            response = None  # Slack's answer (user_not_found...): kept, so that id costs no call for a while
        except NETWORK_ERRORS as error:
            log.debug("users.info failed for %s: %s", user, error)
            return None  # not an answer: asked again next time
        info = (response or {}).get("user") or {}
        profile = info.get("profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or info.get("real_name") or info.get("name")
        self._names[user] = (name or None, asyncio.get_running_loop().time() + NAME_TTL)
        self._names.move_to_end(user)
        while len(self._names) > MAX_NAMES:
            self._names.popitem(last=False)
        return name or None


async def _acknowledge() -> None:
    """The events' listener: `_take_in`, its middleware, did the work; Bolt acks."""


def _entry(body: dict[str, Any], turn: _Turn) -> Entry:
    """The inbox entry of a turn: the turn itself, keyed by the user's message."""
    team = body.get("team_id") or "-"
    route = {name: getattr(turn, name)
             for name in ("channel", "ts", "thread_ts", "has_files", "followup", "in_dm", "listened")}
    return Entry(
        key=f"slack:{team}:{turn.channel}:{turn.ts}", platform="slack", conversation=turn.conversation,
        user=turn.user, text=turn.raw_text, route=route,
    )  # fmt: skip


def _said_to_others(text: str) -> bool:
    """A message that mentions someone (the bot's own mention is handled before), a user group,
    or the channel: said to them, not to the bot."""
    return bool(mentioned_users(text)) or "<!subteam^" in text or any(
        token in text for token in ("<!channel", "<!here", "<!everyone")
    )


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
