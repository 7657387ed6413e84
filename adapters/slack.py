"""The Slack adapter: slack_bolt's AsyncApp in Socket Mode or HTTP mode.

Answers mentions in channels and messages in DMs (and, optionally, follow-ups
in threads it already answered), once per user message, in a thread by
default. Translation only: Slack event -> IncomingMessage -> engine -> text.
The AI-app surface around it (thinking status, suggested prompts, Home tab,
feedback buttons) is adapters/slack_surface.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters.base import IncomingMessage, ReplyTasks, forget, respond, split_message
from adapters.dedupe import DedupeStore, InProcessDedupe
from adapters.slack_surface import SlackSurface
from adapters.slack_text import mentioned_users, to_model_text, to_slack_text
from bot.config import Settings
from bot.engine import Reply, ReplyEngine

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
# Slack truncates at 40,000 and advises far less per message; a section block (the last
# chunk, which carries the feedback buttons) holds 3,000.
MAX_CHUNK = 3000
RESET_WORDS = frozenset({"reset", "forget"})
RESET_DONE = "Okay, I've forgotten our conversation here. Let's start over!"
DEDUPE_TTL = 3600.0  # Slack retries for about 5 minutes; keep keys well past that
NAME_TTL = 3600.0
MAX_NAMES = 5_000
MAX_THREADS = 10_000
CONNECT_TIMEOUT = 30.0


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
    in_dm: bool = False


class SlackAdapter:
    name = "slack"

    def __init__(self, settings: Settings, engine: ReplyEngine, dedupe: DedupeStore | None = None) -> None:
        if not settings.slack_bot_token:
            raise ValueError("SlackAdapter needs SLACK_BOT_TOKEN")
        if not settings.slack_app_token and not settings.slack_signing_secret:
            raise ValueError("SlackAdapter needs SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode)")
        self.settings = settings
        self.engine = engine
        self.dedupe = dedupe or InProcessDedupe()
        self.socket_mode = bool(settings.slack_app_token)
        self.client = AsyncWebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url)
        self.client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=3))
        self.app = AsyncApp(
            client=self.client,
            # Passed explicitly: Bolt would otherwise read SLACK_SIGNING_SECRET itself.
            signing_secret=settings.slack_signing_secret or "",
            logger=_bolt_logger(),
        )
        self.app.middleware(self._refuse_when_stopping)
        self.app.event("app_mention")(self._on_event)
        self.app.event("message")(self._on_event)
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
        self._threads: OrderedDict[tuple[str, str], None] = OrderedDict()  # threads we answered in
        self._in_order = _KeyedLocks()
        self._started = False
        self._closed = False

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
        except (SlackClientError, OSError) as error:
            raise SlackStartError(f"Cannot reach Slack at {self.settings.slack_api_url}: {error}") from None
        self._bot_user_id = auth.get("user_id")
        if self.socket_mode:
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            try:
                # Asked here rather than by the handler, which would retry a refused token forever.
                opened = await self.client.apps_connections_open(app_token=self.settings.slack_app_token)
            except SlackApiError as error:
                raise SlackStartError(f"Slack refused SLACK_APP_TOKEN: {error.response.get('error')}") from None
            except (SlackClientError, OSError) as error:
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

    async def _on_event(
        self, body: dict[str, Any], event: dict[str, Any], set_status: AsyncSetStatus | None = None
    ) -> None:
        turn = self._turn_for(body, event)
        if turn is None:
            return
        # One reply per user message: Slack retries an event with the same event_id,
        # and a mention can also arrive as a `message` event with the same channel and ts.
        event_id = body.get("event_id")
        if event_id and not await self._first_time(f"slack:event:{event_id}"):
            log.debug("Ignoring a repeated Slack event %s", event_id)
            return
        if not await self._first_time(f"slack:message:{turn.channel}:{turn.ts}"):
            log.debug("Ignoring a second event for message %s in %s", turn.ts, turn.channel)
            return
        # Bolt's set_status points at the message's thread (or the message): the status shows
        # where the answer goes, in a DM or a thread; a reply in the channel itself gets the hourglass.
        if set_status is not None and not (turn.in_dm or set_status.thread_ts == turn.thread_ts):
            set_status = None
        self._tasks.spawn(self._reply(turn, set_status), name=f"slack-reply-{turn.channel}-{turn.ts}")

    async def _first_time(self, key: str) -> bool:
        try:
            return await self.dedupe.first_time(key, DEDUPE_TTL)
        except Exception:
            # A shared store that is down must not silence the bot: a rare double answer is the lesser harm.
            log.warning("The dedupe store failed; answering without de-duplication", exc_info=True)
            return True

    def _turn_for(self, body: dict[str, Any], event: dict[str, Any]) -> _Turn | None:
        """The turn to answer for this event, or None if it is not for us."""
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not (user and channel and ts):
            return None
        # Edits, deletions, bot posts, broadcasts, joins...: only plain user messages are answered.
        if event.get("subtype") or event.get("bot_id") or user == self._bot_user_id:
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
        if event.get("type") == "message" and not is_dm:
            # Channel messages reach us only as thread follow-ups (message.channels scope).
            if not (self.settings.slack_thread_followups and thread and (channel, thread) in self._threads):
                return None
        if is_dm:
            conversation, reply_to = f"slack:{team}:{channel}", thread
        elif self.settings.slack_reply_in_thread:
            reply_to = thread or ts
            conversation = f"slack:{team}:{channel}:{reply_to}"
        else:
            conversation, reply_to = f"slack:{team}:{channel}", thread
        return _Turn(conversation, user, event.get("text") or "", channel, ts, reply_to, in_dm=is_dm)

    # -- answering -------------------------------------------------------

    async def _reply(self, turn: _Turn, set_status: AsyncSetStatus | None = None) -> None:
        # The hint goes up at once, even while an earlier message of the conversation is being answered.
        hint = asyncio.create_task(self.surface.thinking.show(turn.channel, turn.ts, set_status))
        try:
            # Entered before the first await, so replies of one conversation go out in the order the
            # messages came, even when posting an earlier answer waits out a rate limit.
            async with self._in_order.hold(turn.conversation):
                names = await self._names_for(mentioned_users(turn.raw_text))
                model_text = to_model_text(turn.raw_text, bot_user_id=self._bot_user_id, names=names)
                if model_text.strip(" .!").lower() in RESET_WORDS:
                    reply: Reply | None = Reply(await forget(self.engine, turn.conversation, RESET_DONE))
                else:
                    message = IncomingMessage("slack", turn.conversation, turn.user, model_text)
                    reply = await respond(self.engine, message)
                if reply and reply.text:
                    await self._post(turn, reply)
        finally:
            await self.surface.thinking.clear(await hint)

    async def _post(self, turn: _Turn, reply: Reply) -> None:
        chunks = _chunks(reply.text)
        for index, chunk in enumerate(chunks):
            # The last chunk carries the feedback buttons of a stored exchange.
            blocks = self.surface.reply_blocks(chunk, reply.exchange) if index == len(chunks) - 1 else None
            try:
                await self.client.chat_postMessage(
                    channel=turn.channel, thread_ts=turn.thread_ts, text=chunk, blocks=blocks, link_names=False
                )
            except (SlackClientError, OSError):
                log.exception("Could not post a reply in %s", turn.channel)
                return
        if turn.thread_ts and self.settings.slack_thread_followups:
            self._remember_thread(turn.channel, turn.thread_ts)

    def _remember_thread(self, channel: str, thread_ts: str) -> None:
        self._threads[(channel, thread_ts)] = None
        self._threads.move_to_end((channel, thread_ts))
        while len(self._threads) > MAX_THREADS:
            self._threads.popitem(last=False)

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
        except (SlackClientError, OSError) as error:
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


class _KeyedLocks:
    """A FIFO lock per key, dropped once nobody holds or waits for it: as many as replies in flight."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


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
