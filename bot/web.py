"""The one aiohttp web server of `blender-chat run`: health, readiness, metrics,
the JSON chat API, the web chat page, and the mount point for Slack's events.

`build_app(engine, settings, adapters)` returns the application; `WebState`
is what the runtime flips on shutdown so new requests are answered 503 while
the replies in flight finish. Who may use the page and the API: the token rule
here, the Host, Origin and Content-Type rules in bot/webaccess.py.

/healthz fails once a platform has stopped for good (a reset token), so the
process gets restarted; /readyz is about answering: a platform reconnecting
makes it 503, a memory store, Redis or an inbox that cannot be used only "degraded"
(the bot answers without them), reported in its body and in
`blenderchat_dependency_up`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bot.config import Settings, parse_duration
from bot.engine import NO_ANSWER, ReplyEngine
from bot.errors import (
    AnswerGone,
    ConversationBusy,
    EmptyMessage,
    EngineBusy,
    MemoryUnavailable,
    MessageTooLong,
    NoOtherAnswer,
    NotLatest,
    PersonaRefused,
    RateLimited,
    ReplyError,
    ReplyTimeout,
    UserBlocked,
)
from bot.feedback import feedback_report
from bot.inbox import Claim, Entry, Inbox
from bot.inflight import InFlight
from bot.memory import RATINGS, ChannelSettings, ExchangeRef, StoreUnavailable
from bot.ratelimit import RateLimiter, TokenBucketLimiter
from bot.text import clean_text
from bot.webaccess import OPEN_PATHS, is_loopback, make_request_guard

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# Web conversation and user ids: what a browser's crypto.randomUUID() or a script would use.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How long /readyz waits for the memory store or Redis before calling it unavailable.
PING_TIMEOUT = 2.0
FEEDBACK_WINDOW = 7 * 86400.0  # GET /api/feedback counts this far back unless told otherwise
FEEDBACK_RECENT = 20  # ... and lists this many recent ratings of web conversations
FEEDBACK_RECENT_MAX = 200


class Pingable(Protocol):
    """What /readyz needs of the state shared with other replicas (`bot.shared.SharedState`)."""

    async def ping(self) -> None: ...


class WebState:
    """What the handlers share with the runtime: the adapters and the shared
    Redis state to report on, whether the process is shutting down, the API
    requests in flight, and the web API's own limits: a rate per caller and a
    share of the queue."""

    def __init__(
        self,
        engine: ReplyEngine,
        settings: Settings,
        adapters: Sequence[Any] = (),
        shared: Pingable | None = None,
        caller_limiter: RateLimiter | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        self.engine = engine
        self.inbox = inbox or Inbox.in_process(settings, engine.metrics)
        self._replays: set[asyncio.Task[None]] = set()
        self.settings = settings
        self.adapters = list(adapters)
        self.shared = shared
        self.closing = False
        self.requests = InFlight()  # API requests being answered
        self.chats = InFlight()  # of those, /api/chat requests: at most `chat_budget`
        self.chat_budget = max(1, settings.queue_size * settings.web_queue_percent // 100)
        per_minute = settings.web_rate_limit_per_minute
        # Not `caller_limiter or ...`: a TokenBucketLimiter with no buckets yet is falsy (len() 0).
        self.caller_limiter = (
            caller_limiter if caller_limiter is not None
            else TokenBucketLimiter(burst=max(1, per_minute), per_minute=per_minute)
        )

    def stop_accepting(self) -> None:
        self.closing = True

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for API requests in flight; True if all finished."""
        return await self.requests.wait(timeout)

    def replay(self, claim: Claim) -> None:
        """A web API message a stopped process left unanswered: its caller is gone, so
        it is only answered and stored, and `GET /api/history` shows it."""
        entry = claim.entry
        ticket = self.engine.take_ticket(entry.conversation, arrived=entry.arrived)  # ahead of later messages

        async def answer() -> None:
            with self.requests:  # a shutdown waits for it as for a request
                try:
                    await self.engine.respond(entry.conversation, entry.text, user=entry.user, platform="web",
                                              ticket=ticket, exchange_id=entry.exchange_id,
                                              channel=entry.conversation)  # fmt: skip
                except ReplyError:
                    pass  # nobody to tell
                finally:
                    ticket.release()
                await self.inbox.finish(claim)

        task = asyncio.create_task(answer(), name=f"web-replay-{entry.key}")
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)


STATE = web.AppKey("state", WebState)


def build_app(
    engine: ReplyEngine,
    settings: Settings,
    adapters: Sequence[Any] = (),
    *,
    shared: Pingable | None = None,
    caller_limiter: RateLimiter | None = None,
    inbox: Inbox | None = None,
) -> web.Application:
    """The application; `app[STATE]` is its `WebState`. `shared` (Redis) is
    checked by /readyz along with the memory store; `caller_limiter` counts
    each web API caller's messages (default: in this process; with several
    replicas, `SharedState.web_limiter`). `inbox` records each chat message until
    it is answered (bot/inbox)."""
    state = WebState(engine, settings, adapters, shared, caller_limiter, inbox)
    # aiohttp's 1 MiB, or more for a JSON body around the longest text allowed (an escape takes up
    # to 12 bytes a character); Slack's events, carrying text and blocks, can be large too.
    app = web.Application(
        client_max_size=max(1024 * 1024, settings.max_input_chars * 12 + 4096),
        middlewares=[
            _json_errors, make_request_guard(settings), _make_access_guard(settings), _make_shutdown_guard(state)
        ],
    )
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/chat", api_chat)
    app.router.add_post("/api/again", api_again)
    app.router.add_get("/api/history", api_history)
    app.router.add_post("/api/reset", api_reset)
    app.router.add_post("/api/feedback", api_rate)
    app.router.add_get("/api/feedback", api_feedback)
    app.router.add_get("/api/settings", api_settings)
    app.router.add_put("/api/settings", api_set_settings)
    app.router.add_get("/", chat_page)
    app.router.add_static("/static/", STATIC_DIR)
    return app



# -- middlewares -------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413...) as JSON under /api/, like ours."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if not request.path.startswith("/api/") or error.status < 400:
            raise
        reasons = {413: "The request body is too large."}
        message = reasons.get(error.status, error.reason + ".")
        return _error(error.status, error.reason.lower().replace(" ", "_"), message)


def _make_access_guard(settings: Settings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """With WEB_API_TOKEN set the API always needs `Authorization: Bearer $WEB_API_TOKEN`,
    on 127.0.0.1 too (a TLS proxy on the same host would otherwise open it to
    everyone); without one it is open on a loopback address and off on any other.
    The page itself holds no data: it is served whenever the API is on, and asks
    the user for the token."""
    open_to_all = is_loopback(settings.http_host)
    token = settings.web_api_token
    if not open_to_all and not token:
        log.warning(
            "The web chat and /api are disabled: HTTP_HOST=%s is reachable from other machines and "
            "WEB_API_TOKEN is not set. Set WEB_API_TOKEN to enable them (health, readiness, metrics "
            "and Slack events stay available).",
            settings.http_host,
        )

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if (open_to_all and not token) or path.startswith(OPEN_PATHS):
            return await handler(request)
        if not token:
            if path.startswith("/api/"):
                return _error(403, "disabled", "The API is disabled: set WEB_API_TOKEN to use it on this address.")
            return web.Response(status=403, text="The web chat is disabled: set WEB_API_TOKEN to use it.\n")
        if path.startswith("/api/") and not _bearer_matches(request, token):
            return _error(
                401, "unauthorized", "Send the header Authorization: Bearer <WEB_API_TOKEN>.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return guard


def _bearer_matches(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of the token was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _make_shutdown_guard(state: WebState) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        if state.closing:
            return _error(503, "closed", "The bot is restarting right now. Please try again in a minute.",
                          headers={"Retry-After": "30"})
        with state.requests:
            return await handler(request)

    return guard


# -- health, readiness, metrics ---------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop is turning; a stalled loop times out the probe.
    # A platform that stopped for good (a reset token) fails it, so the process is restarted.
    failures = [f"{adapter.name}: {adapter.failure}" for adapter in request.app[STATE].adapters if adapter.failure]
    if failures:
        return web.json_response({"status": "failed", "reason": "; ".join(failures)}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready means able to answer: not shutting down, the engine running, every
    platform connected. A memory store or Redis that cannot be reached does not
    stop answers (they go on without history, locks, shared limits): it is
    reported as `degraded`, and a load balancer keeps the replica."""
    state = request.app[STATE]
    reasons = []
    if state.closing:
        reasons.append("shutting down")
    elif not state.engine.ready:
        reasons.append("the reply engine is not running")
    for adapter in state.adapters:
        if not adapter.connected:
            reasons.append(f"{adapter.name} is not connected")
    degraded = await _dependencies(state)
    if reasons:
        return web.json_response({"ready": False, "reason": "; ".join(reasons), "degraded": degraded}, status=503)
    return web.json_response(
        {"ready": True, "adapters": [adapter.name for adapter in state.adapters], "degraded": degraded}
    )


async def _dependencies(state: WebState) -> list[str]:
    """Check the memory store and Redis now, and whether the inbox's last write worked; what
    cannot be used, and `dependency_up` set to match (the inbox sets its own)."""
    store_error, shared_error = await asyncio.gather(_ping(state.engine.store), _ping(state.shared))
    gauge = state.engine.metrics.dependency_up
    degraded = []
    gauge.labels("memory").set(store_error is None)
    if store_error is not None:
        backend = state.settings.memory_url.partition(":")[0]  # redis, sqlite... never the URL itself
        degraded.append(f"the memory store is unavailable ({backend}: {store_error}): answering without history")
    if state.shared is not None:
        gauge.labels("redis").set(shared_error is None)
    if shared_error is not None:
        degraded.append(f"Redis for locks, rate limits and de-duplication is unavailable ({shared_error})")
    if state.inbox.failure is not None:  # as of its last write (every message, and a scan every INBOX_LEASE/2)
        degraded.append(
            f"the inbox cannot be written ({state.inbox.store.name}: {state.inbox.failure}): messages are "
            "still answered, but one cut short by a crash now would be lost"
        )
    return degraded


async def _ping(target: Pingable | None) -> str | None:
    """None if `target` is absent or answers in time, else a short reason (the
    error's kind: its text can name hosts and paths, not for an open endpoint)."""
    if target is None:
        return None
    try:
        await asyncio.wait_for(target.ping(), PING_TIMEOUT)
    except Exception as error:  # any failure means not ready
        return type(error).__name__
    return None


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await _dependencies(state)  # blenderchat_dependency_up as of this scrape
    body = state.engine.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- the JSON API ------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The body must be JSON, e.g. {\"conversation\": \"abc\", \"text\": \"Hello\"}.") from None
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.")
    return data


def _conversation_id(value: Any) -> str:
    """The id the caller gave; stored as `web:<id>`, apart from Discord's and Slack's conversations."""
    if value is None:
        raise BadRequest("Missing field: conversation.")
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadRequest("conversation must be 1 to 100 letters, digits or _ . : -")
    return value


def _exchange_id(value: Any) -> str:
    """A reply's id, as `/api/chat` or `/api/history` gave it."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadRequest("exchange_id must be the id /api/chat or /api/history gave for that reply.")
    return value


def _conversation(value: Any) -> str:
    return f"web:{_conversation_id(value)}"


def _user(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not ID_PATTERN.fullmatch(value)):
        raise BadRequest("user must be 1 to 100 letters, digits or _ . : -")
    return value


def _bad_request(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as error:
            return _error(400, "bad_request", error.message)

    return wrapped


# How each expected failure of a reply is answered over HTTP.
_STATUS = {
    EmptyMessage: 400,
    MessageTooLong: 413,
    RateLimited: 429,
    ConversationBusy: 429,
    UserBlocked: 403,
    ReplyTimeout: 504,
    EngineBusy: 503,  # EngineClosed too
    NotLatest: 409,
    NoOtherAnswer: 409,
    AnswerGone: 404,
    MemoryUnavailable: 503,
}


def _reply_error(error: ReplyError) -> web.Response:
    status = next((code for kind, code in _STATUS.items() if isinstance(error, kind)), 500)
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    message = error.user_message or "You cannot use this bot."
    return _error(status, error.outcome, message, headers)


@_bad_request
async def api_chat(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = await _json_object(request)
    conversation_id = _conversation_id(data.get("conversation"))
    text = data.get("text")
    if text is None:
        raise BadRequest("Missing field: text.")
    if not isinstance(text, str):
        raise BadRequest("text must be a string.")
    user = _user(data.get("user"))
    # The request's place in its conversation's line, before anything awaits.
    with state.engine.take_ticket(f"web:{conversation_id}") as ticket, state.chats:
        refused = await _refused(request, state.engine.metrics.replies)
        if refused is not None:
            return refused
        # The user is the `user` field, else the conversation: `web:<id>`, as BLOCKED_USERS names them.
        entry = Entry(f"web:{uuid.uuid4().hex}", "web", ticket.conversation, f"web:{user or conversation_id}", text)
        # Recorded, so that if this process dies the exchange is still stored (the caller is gone).
        claim = await state.inbox.accept(entry)
        try:
            # A web conversation's own settings (its persona, PUT /api/settings) are kept under its key.
            reply = await state.engine.respond(
                ticket.conversation, text, user=entry.user, platform="web", ticket=ticket,
                exchange_id=entry.exchange_id, channel=ticket.conversation,
            )
        except ReplyError as error:
            return _reply_error(error)
        finally:
            if claim is not None:
                await state.inbox.finish(claim)
    # `exchange_id` names the stored exchange, for POST /api/feedback; `at` is when it was
    # stored. Both null when nothing was stored (a deflection, or the memory was down).
    exchange_id = reply.exchange.id if reply.exchange else None
    return web.json_response({"reply": reply.text, "exchange_id": exchange_id, "at": reply.at})


async def _refused(request: web.Request, counter: Any) -> web.Response | None:
    """The answer to a chat or try-again request the web API does not take now (its share of
    the queue is used, or the caller is over its rate), counted in `counter` as the engine
    counts its own refusals; None if it is taken. Called holding a place in `state.chats`."""
    state = request.app[STATE]
    try:
        if state.chats.count > state.chat_budget:
            raise EngineBusy()  # the rest of the queue is kept for Discord and Slack
        # Per caller as well as per user: a client sending a new `user` each time gains nothing.
        await state.caller_limiter.acquire(_caller(request))
    except ReplyError as error:
        counter.labels("web", error.outcome).inc()
        return _reply_error(error)
    return None


@_bad_request
async def api_again(request: web.Request) -> web.Response:
    """Try again: `{"conversation": "abc", "exchange_id": <the latest reply's id>}`. A new answer
    to the same message replaces that reply (in `GET /api/history` too) under a new
    `exchange_id`; an older reply gets 409 `not_latest`. Limited like a message."""
    state = request.app[STATE]
    data = await _json_object(request)
    conversation_id = _conversation_id(data.get("conversation"))
    exchange_id = _exchange_id(data.get("exchange_id"))
    user = _user(data.get("user"))
    with state.engine.take_ticket(f"web:{conversation_id}") as ticket, state.chats:
        refused = await _refused(request, state.engine.metrics.retries)
        if refused is not None:
            return refused
        try:
            reply = await state.engine.retry(ticket.conversation, exchange_id, user=f"web:{user or conversation_id}",
                                             platform="web", ticket=ticket, channel=ticket.conversation)  # fmt: skip
        except ReplyError as error:
            return _reply_error(error)
    assert reply.exchange is not None  # a retry always stores its answer
    return web.json_response({"reply": reply.text, "exchange_id": reply.exchange.id, "at": reply.at})


def _caller(request: web.Request) -> str:
    """Who sent a web API request, for its rate limit: the bearer token when one is
    configured (every request carries it; the key never holds the token), else the client address."""
    if request.app[STATE].settings.web_api_token:
        return "web-caller:token"
    return f"web-caller:{request.remote or 'unknown'}"


@_bad_request
async def api_history(request: web.Request) -> web.Response:
    conversation = _conversation(request.query.get("conversation"))
    exchanges = await request.app[STATE].engine.history(conversation)
    return web.json_response(
        {
            "exchanges": [
                # The reply as it was shown: decoded text starts with a space and may hold control characters.
                {"id": exchange.id, "user": exchange.user, "bot": clean_text(exchange.bot) or NO_ANSWER,
                 "at": exchange.at}
                for exchange in exchanges
            ]
        }
    )


@_bad_request
async def api_reset(request: web.Request) -> web.Response:
    data = await _json_object(request)
    conversation = _conversation(data.get("conversation"))
    # A web conversation is one person's, like a DM: forgetting it forgets its settings too.
    forgotten = await request.app[STATE].engine.reset(conversation, with_settings=True)
    return web.json_response({"reset": forgotten})


@_bad_request
async def api_settings(request: web.Request) -> web.Response:
    """A web conversation's settings: `{"persona": [its lines] or null, ...}` (null: PERSONA's)."""
    conversation = _conversation(request.query.get("conversation"))
    engine = request.app[STATE].engine
    try:
        settings = await engine.channel_settings(conversation)
    except StoreUnavailable:
        return _memory_unavailable()
    return web.json_response(_settings_view(engine, settings))


@_bad_request
async def api_set_settings(request: web.Request) -> web.Response:
    """Give a web conversation a persona of its own: `{"conversation": "abc", "persona": "I love
    hiking | I have a dog"}` (facts separated by | or newlines), or `"persona": null` for the
    default (PERSONA) again. A persona the safety filter or the model's window refuses is 422,
    with the reason, and nothing changes. Answers the settings as GET /api/settings does."""
    data = await _json_object(request)
    conversation = _conversation(data.get("conversation"))
    if "persona" not in data:
        raise BadRequest("Missing field: persona (a text, or null for the default).")
    if "listen" in data:
        raise BadRequest("listen is for Discord and Slack channels (/blenderbot listen on|off); the web chat "
                         "answers every message already.")
    persona = data["persona"]
    if persona is not None and not isinstance(persona, str):
        raise BadRequest("persona must be a text (facts separated by |) or null.")
    if isinstance(persona, str) and len(persona) > request.app[STATE].settings.max_input_chars:
        raise BadRequest(f"persona must be at most {request.app[STATE].settings.max_input_chars} characters.")
    engine = request.app[STATE].engine
    try:
        if persona is None:
            await engine.reset_settings(conversation)
        else:
            await engine.set_persona(conversation, persona)
        settings = await engine.channel_settings(conversation)
    except PersonaRefused as refused:
        return _error(422, "persona_refused", str(refused))
    except StoreUnavailable:
        return _memory_unavailable()
    return web.json_response(_settings_view(engine, settings))


def _settings_view(engine: ReplyEngine, settings: ChannelSettings) -> dict[str, Any]:
    """`persona`: the conversation's own lines, or null; `default_persona`: PERSONA's (null if none)."""
    return {"persona": list(settings.persona) or None, "default_persona": list(engine.settings.persona) or None}


def _memory_unavailable() -> web.Response:
    return _error(503, "memory_unavailable", "The memory store is unavailable right now. Please try again later.",
                  headers={"Retry-After": "30"})


@_bad_request
async def api_rate(request: web.Request) -> web.Response:
    """Rate a reply: `{"conversation": "abc", "exchange_id": <its id>, "rating": "good" | "bad"}`.
    The rater is the caller (as for its rate limit), not `user`, which a caller
    may set to anything: one rating per reply and caller, a new one replacing it."""
    state = request.app[STATE]
    data = await _json_object(request)
    conversation = _conversation(data.get("conversation"))
    exchange_id = _exchange_id(data.get("exchange_id"))
    rating = data.get("rating")
    if rating not in RATINGS:
        raise BadRequest("rating must be \"good\" or \"bad\".")
    user = _user(data.get("user"))
    if f"web:{user or conversation.removeprefix('web:')}" in state.settings.blocked_users:  # as /api/chat names them
        return _error(403, UserBlocked.outcome, UserBlocked.user_message or "You cannot use this bot.")
    caller = _caller(request)
    try:
        await state.caller_limiter.acquire(caller)  # the same budget as the caller's chat messages
    except ReplyError as error:
        return _reply_error(error)
    try:
        stored = await state.engine.rate(ExchangeRef(conversation, exchange_id), rating, user=caller, platform="web")
    except StoreUnavailable:
        return _error(503, "memory_unavailable", "Ratings cannot be stored right now. Please try again later.",
                      headers={"Retry-After": "30"})
    if not stored:
        return _error(404, "not_found", "There is no such reply in this conversation (it may have been forgotten).")
    return web.json_response({"recorded": True})


async def api_feedback(request: web.Request) -> web.Response:
    """Counts by platform and rating over `?window=` (default 7d), and the `?recent=` latest
    ratings of web conversations with their exchange."""
    window_text = request.query.get("window")
    window = FEEDBACK_WINDOW if window_text is None else parse_duration(window_text)
    if window is None:
        return _error(400, "bad_request", "window must be a duration such as 90s, 15m, 12h or 7d.")
    recent_text = request.query.get("recent", str(FEEDBACK_RECENT))
    if not recent_text.isdigit() or int(recent_text) > FEEDBACK_RECENT_MAX:
        return _error(400, "bad_request", f"recent must be a whole number from 0 to {FEEDBACK_RECENT_MAX}.")
    since = time.time() - window
    try:
        report = await feedback_report(request.app[STATE].engine.store, since=since, recent=int(recent_text))
    except StoreUnavailable:
        return _error(503, "memory_unavailable", "The memory store is unavailable right now. Please try again later.",
                      headers={"Retry-After": "30"})
    return web.json_response({"window": window, **report})


# -- the page ----------------------------------------------------------------


async def chat_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
