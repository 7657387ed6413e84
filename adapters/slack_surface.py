"""Slack's AI-app surface around the answers, built from Bolt's own helpers.

- While a reply is generated: Slack's "is thinking..." status (`set_status` with
  loading messages, `chat:write`) on the thread the reply goes to (a DM's reply
  goes in the thread of the user's message, as Slack's agent experience shows
  it). Where the reply has no thread (a channel message answered in the
  channel), or Slack refuses the status, the hourglass reaction instead. Never both.
- When someone opens the Messages tab (Slack's agent experience, `agent_view`):
  a one-line greeting, once per person, and SLACK_SUGGESTED_PROMPTS when they are
  not the manifest's own (set the agent way: no `thread_ts`). Apps still on the
  legacy assistant experience (`assistant_view`) get both in each new assistant
  thread (`assistant_thread_started`).
- The Home tab (`views.publish`): what the bot is, what it remembers and for how
  long, and a "Forget my conversations" button.
- Feedback buttons under every reply that is a stored exchange; a click is acked
  at once, stored against that exchange, counted, and answered with a note only
  the clicker sees.
- A "Try again" button below them: another answer to the same message, edited into
  the reply (`chat.update`, with buttons naming the new exchange). Only the latest
  answer of a conversation can be redone; on an older one, or over the rate limit,
  the clicker gets a note saying so. (It is a plain button in an `actions` block:
  a `context_actions` block takes only feedback buttons and icon buttons, and the
  only icon Slack offers is a trash can.)

Every call here is a nicety: when it fails the answer still goes out, and a scope
the workspace has not granted is logged once (`Niceties`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ConfirmObject,
    ContextActionsBlock,
    ContextBlock,
    FeedbackButtonObject,
    FeedbackButtonsElement,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.base import redo
from adapters.dedupe import DedupeStore, InProcessDedupe
from adapters.slack_text import to_slack_text
from bot.config import DEFAULT_SLACK_PROMPTS, Settings
from bot.engine import ReplyEngine
from bot.locks import Ticket
from bot.memory import BAD, GOOD, ExchangeRef, StoreUnavailable

log = logging.getLogger(__name__)

PROGRESS_REACTION = "hourglass_flowing_sand"
STATUS = "is thinking..."
LOADING_MESSAGES = ["Thinking...", "Finding the right words...", "Putting a reply together..."]
GREETING = "Hi! I'm BlenderBot, a chat bot running on our own server. Ask me anything, or pick a suggestion."
PROMPTS_TITLE = "Try asking me"
# The suggested prompts slack-manifest.yml gives agent_view (tests/test_manifest.py holds the two equal):
# Slack shows them by itself, so the bot sets prompts only when SLACK_SUGGESTED_PROMPTS is something else.
MANIFEST_PROMPTS = DEFAULT_SLACK_PROMPTS
FEEDBACK_ACTION = "reply_feedback"
FORGET_ACTION = "forget_my_conversations"
AGAIN_ACTION = "reply_again"
AGAIN_LABEL = "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS} Try again"
SECTION_LIMIT = 3000  # characters of text a section block holds
THANKS = {
    GOOD: "Thanks for the feedback: glad that reply worked for you!",
    BAD: "Thanks for the feedback: that reply is noted as a bad one.",
}
NOT_KEPT = "Thanks for the feedback! That conversation is no longer remembered, so the rating could not be kept."
FORGOTTEN = ":white_check_mark: Done: I've forgotten our direct messages (and your ratings in them)."
NOTHING_TO_FORGET = ":white_check_mark: There was nothing to forget: I remember no direct messages with you."
FORGET_FAILED = ":warning: Sorry, I could not forget our conversation just now. Please try again."
SCOPE_RECHECK = 3600.0  # a missing scope is tried again after this long (it may have been granted)
GREETED_TTL = 365 * 86400.0
_DM_CONVERSATION = re.compile(r"slack:[A-Z0-9]+:D[A-Z0-9]+")
_EXCHANGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
# What a Web API call can fail with besides Slack's own answer: the connection (aiohttp
# raises ServerDisconnectedError, ClientPayloadError... which are neither SlackClientError nor OSError).
NETWORK_ERRORS = (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class Niceties:
    """Calls that only make the bot nicer (status, prompts, reactions, the Home tab).
    A failure costs that nicety, never the reply. A scope the workspace has not
    granted is logged once, and the call is skipped for a while instead of failing
    on every message."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._skip_until: dict[str, float] = {}
        self._warned: set[str] = set()

    def available(self, method: str) -> bool:
        return self._skip_until.get(method, 0.0) <= self._clock()

    async def call(self, method: str, call: Callable[[], Awaitable[Any]]) -> bool:
        """Run `call` (Slack's `method`); True if it went through."""
        if not self.available(method):
            return False
        try:
            await call()
        except SlackApiError as error:
            code = error.response.get("error")
            if code == "missing_scope":
                self._skip_until[method] = self._clock() + SCOPE_RECHECK
                if method not in self._warned:
                    self._warned.add(method)
                    log.warning(
                        "Slack refused %s: the app lacks the %s scope. Add it (slack-manifest.yml lists every "
                        "scope) and reinstall the app; until then the bot goes on without it.",
                        method, error.response.get("needed") or "needed",
                    )
            else:
                log.debug("%s failed: %s", method, code)
            return False
        except NETWORK_ERRORS as error:
            log.debug("%s failed: %s", method, error)
            return False
        return True


@dataclass
class Shown:
    """What `Thinking.show` put up, so `clear` takes down exactly that."""

    channel: str
    ts: str
    status: AsyncSetStatus | None = None  # the thread's status is set
    reacted: bool = False  # the hourglass sits on the message


class Thinking:
    """Slack's status on the reply's thread; the hourglass reaction where there is no
    thread for it, or Slack refused it."""

    def __init__(self, client: AsyncWebClient, niceties: Niceties) -> None:
        self.client = client
        self.niceties = niceties
        self._pending: Counter[tuple[str, str]] = Counter()  # replies in flight per status thread

    async def show(self, channel: str, ts: str, set_status: AsyncSetStatus | None) -> Shown:
        """`set_status`: Bolt's helper for the thread the reply goes to; None where the
        reply goes to no thread (a channel message answered in the channel)."""
        if set_status is not None:
            key = (set_status.channel_id, set_status.thread_ts)
            self._pending[key] += 1
            if await self._set(set_status, STATUS):
                return Shown(channel, ts, status=set_status)
            self._done(key)
        reacted = await self.niceties.call(
            "reactions.add",
            lambda: self.client.reactions_add(channel=channel, timestamp=ts, name=PROGRESS_REACTION),
        )
        return Shown(channel, ts, reacted=reacted)

    async def clear(self, shown: Shown) -> None:
        if shown.status is not None:
            key = (shown.status.channel_id, shown.status.thread_ts)
            # Slack clears a thread's status when a reply is posted in it: another reply
            # still on its way in the same thread puts it back up.
            await self._set(shown.status, STATUS if self._done(key) else "")
        elif shown.reacted:
            await self.niceties.call(
                "reactions.remove",
                lambda: self.client.reactions_remove(channel=shown.channel, timestamp=shown.ts,
                                                     name=PROGRESS_REACTION),
            )

    async def _set(self, set_status: AsyncSetStatus, status: str) -> bool:
        loading = LOADING_MESSAGES if status else None
        return await self.niceties.call(
            "assistant.threads.setStatus", lambda: set_status(status=status, loading_messages=loading)
        )

    def _done(self, key: tuple[str, str]) -> int:
        """One reply of that thread finished; how many are still in flight there."""
        self._pending[key] -= 1
        if self._pending[key] <= 0:
            del self._pending[key]
            return 0
        return self._pending[key]


class SlackSurface:
    """The listeners for the Messages and Home tabs and the buttons, and what
    replies carry. `spawn` runs work as a tracked reply (drained on shutdown)."""

    def __init__(
        self,
        settings: Settings,
        engine: ReplyEngine,
        client: AsyncWebClient,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
        greeted: DedupeStore | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.spawn = spawn
        self.niceties = Niceties()
        self.thinking = Thinking(client, self.niceties)
        # A store of its own by default: greetings are kept far longer than event ids.
        self.greeted = greeted or InProcessDedupe(max_keys=50_000)

    def register(self, app: AsyncApp) -> None:
        app.event("app_home_opened")(self._on_home_opened)
        app.event("assistant_thread_started")(self._on_thread_started)
        app.action(FEEDBACK_ACTION)(self._on_feedback)
        app.action(FORGET_ACTION)(self._on_forget)
        app.action(AGAIN_ACTION)(self._on_again)

    # -- what replies carry ------------------------------------------------

    def reply_blocks(self, text: str, exchange: ExchangeRef | None) -> list[dict[str, Any]] | None:
        """Blocks for the last chunk of a reply: its text, the feedback buttons and "Try
        again". None for answers that are no stored exchange (errors, confirmations,
        deflections)."""
        if exchange is None:
            return None
        value = f"{exchange.id}|{exchange.conversation}"
        buttons = FeedbackButtonsElement(
            action_id=FEEDBACK_ACTION,
            positive_button=FeedbackButtonObject(
                text="Good reply", accessibility_label="Mark this reply as good", value=f"{GOOD}|{value}"
            ),
            negative_button=FeedbackButtonObject(
                text="Bad reply", accessibility_label="Mark this reply as bad", value=f"{BAD}|{value}"
            ),
        )
        again = ButtonElement(text=AGAIN_LABEL, action_id=AGAIN_ACTION, value=value,
                              accessibility_label="Get another answer to the same message")
        return [SectionBlock(text=MarkdownTextObject(text=text)).to_dict(),
                ContextActionsBlock(elements=[buttons]).to_dict(),
                ActionsBlock(elements=[again]).to_dict()]

    # -- the Messages tab and assistant threads -----------------------------

    async def _on_home_opened(self, body: dict[str, Any], event: dict[str, Any], say: Any) -> None:
        user, channel, team = event.get("user"), event.get("channel"), _team(body, event)
        if not user or not self._welcome(team, user):
            return
        if event.get("tab") == "home":
            conversation = f"slack:{team}:{channel}" if channel else None
            await self._publish_home(user, conversation)
        elif event.get("tab") == "messages" and channel:
            # The agent experience's start of a DM (it replaces assistant_thread_started).
            prompts = self._prompts_beyond_the_manifest()
            if prompts:
                # Without thread_ts, always: with it an agent app's call silently fails (Slack's reference).
                await self.niceties.call(
                    "assistant.threads.setSuggestedPrompts",
                    lambda: self.client.assistant_threads_setSuggestedPrompts(
                        channel_id=channel, prompts=prompts, title=PROMPTS_TITLE),
                )
            await self._greet_once(f"slack:{team}:{channel}", team, user, say)

    async def _on_thread_started(self, body: dict[str, Any], event: dict[str, Any], say: Any,
                                 set_suggested_prompts: Any = None) -> None:
        """An app still on the legacy assistant experience: a new assistant thread gets the
        prompts (on that thread: Bolt's helper passes its thread_ts) and the greeting in it."""
        thread = event.get("assistant_thread") or {}
        user, channel, team = thread.get("user_id"), thread.get("channel_id"), _team(body, event)
        if not (user and channel and self._welcome(team, user)):
            return
        prompts = self.settings.slack_suggested_prompts
        if prompts and set_suggested_prompts is not None:
            await self.niceties.call(
                "assistant.threads.setSuggestedPrompts",
                lambda: set_suggested_prompts(prompts=list(prompts), title=PROMPTS_TITLE),
            )
        await self._greet_once(f"slack:{team}:{channel}", team, user, say)

    def _prompts_beyond_the_manifest(self) -> list[dict[str, str]]:
        """SLACK_SUGGESTED_PROMPTS as Slack takes them, when they are not the manifest's own
        (which Slack shows by itself); else none. `off` sets none: the manifest's still show."""
        prompts = self.settings.slack_suggested_prompts
        if not prompts or prompts == MANIFEST_PROMPTS:
            return []
        return [{"title": prompt, "message": prompt} for prompt in prompts]

    async def _greet_once(self, conversation: str, team: str, user: str, say: Any) -> None:
        if await self._first_greeting(conversation, team, user):
            await self.niceties.call("chat.postMessage", lambda: say(text=GREETING))

    async def _first_greeting(self, conversation: str, team: str, user: str) -> bool:
        """Greet a person once: not again after they were greeted, nor when they already
        talked with the bot (its memory of the DM survives restarts, the greeted list may not)."""
        try:
            if await self.engine.history(conversation):
                return False
            return await self.greeted.first_time(f"slack:greeted:{team}:{user}", GREETED_TTL)
        except Exception:
            log.warning("Could not tell whether someone was greeted already; not greeting", exc_info=True)
            return False

    # -- the Home tab --------------------------------------------------------

    async def _publish_home(self, user: str, conversation: str | None, notice: str | None = None) -> None:
        persona = await self._dm_persona(conversation) if conversation is not None else ()
        view = home_view(self.settings, conversation, notice, persona=persona)
        await self.niceties.call("views.publish", lambda: self.client.views_publish(user_id=user, view=view))

    async def _dm_persona(self, conversation: str) -> tuple[str, ...]:
        """The persona given in the person's DM (none when it cannot be read: the tab still shows)."""
        try:
            return (await self.engine.channel_settings(conversation)).persona
        except StoreUnavailable:
            return ()

    async def _on_forget(self, ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user, team = (body.get("user") or {}).get("id"), _team(body, {})
        conversation = action.get("value") or ""
        # The button carries the DM it was published for: only that person's DM with the bot.
        if not user or not _DM_CONVERSATION.fullmatch(conversation) or not conversation.startswith(f"slack:{team}:"):
            return
        if not self._welcome(team, user):
            return
        self.spawn(self._forget(user, conversation))

    async def _forget(self, user: str, conversation: str) -> None:
        try:
            # The person's data: the DM's settings (a persona given there) go with it.
            forgotten = await self.engine.reset(conversation, with_settings=True)
        except Exception:
            log.exception("Could not forget conversation %s", conversation)
            notice = FORGET_FAILED
        else:
            notice = FORGOTTEN if forgotten else NOTHING_TO_FORGET
        await self._publish_home(user, conversation, notice)

    # -- feedback buttons ----------------------------------------------------

    async def _on_feedback(self, ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user, team = (body.get("user") or {}).get("id"), _team(body, {})
        rated = _parse_feedback(action.get("value"))
        if not user or rated is None or not rated[1].conversation.startswith(f"slack:{team}:"):
            return
        if not self._welcome(team, user):
            return
        channel = (body.get("channel") or {}).get("id")
        thread = (body.get("message") or {}).get("thread_ts")
        self.spawn(self._rate(rated[0], rated[1], user, channel, thread))

    async def _rate(self, rating: str, exchange: ExchangeRef, user: str, channel: str | None,
                    thread: str | None) -> None:
        try:
            stored = await self.engine.rate(exchange, rating, user=user, platform="slack")
        except StoreUnavailable:
            stored = False  # already logged
        if channel:
            text = THANKS[rating] if stored else NOT_KEPT
            await self.niceties.call(
                "chat.postEphemeral",
                lambda: self.client.chat_postEphemeral(channel=channel, user=user, thread_ts=thread, text=text),
            )

    # -- "Try again" ----------------------------------------------------------

    async def _on_again(self, ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
        user, team = (body.get("user") or {}).get("id"), _team(body, {})
        exchange = _parse_exchange(action.get("value"))
        channel = (body.get("channel") or {}).get("id")
        message = body.get("message") or {}
        ts = message.get("ts") or (body.get("container") or {}).get("message_ts")
        welcome = bool(user and channel and ts) and self._welcome(team, user or "")
        if exchange is None or not welcome or not exchange.conversation.startswith(f"slack:{team}:"):
            await ack()
            return
        # Its place in the conversation's line, before anything awaits (the ack too), like a message.
        ticket = self.engine.take_ticket(exchange.conversation)
        await ack()
        task = self.spawn(self._again(exchange, str(user), str(channel), str(ts), message.get("thread_ts"), ticket))
        if task is None:
            ticket.release()  # shutting down: refused
        else:
            task.add_done_callback(lambda _: ticket.release())

    async def _again(self, exchange: ExchangeRef, user: str, channel: str, ts: str, thread: str | None,
                     ticket: Ticket) -> None:
        # The channel's persona, as for a message there: the first three parts of its conversation key.
        settings = ":".join(exchange.conversation.split(":")[:3])
        reply = await redo(self.engine, exchange, user, "slack", ticket, channel=settings)
        if reply is None or not reply.text:
            return
        if reply.exchange is None:  # refused (not the latest answer, the rate limit...): tell the clicker
            await self.niceties.call(
                "chat.postEphemeral",
                lambda: self.client.chat_postEphemeral(channel=channel, user=user, thread_ts=thread, text=reply.text),
            )
            return
        text = _fit(to_slack_text(reply.text))
        blocks = self.reply_blocks(text, reply.exchange)
        try:
            await self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks, link_names=False)
        except (SlackApiError, *NETWORK_ERRORS) as error:
            # The new answer is stored; the old one stays shown (deleted meanwhile, or Slack is unreachable).
            reason = error.response.get("error") if isinstance(error, SlackApiError) else error
            log.warning("Could not show a redone answer in %s: %s", channel, reason)

    def _welcome(self, team: str, user: str) -> bool:
        """Whether this workspace and person get anything from the bot at all."""
        if user in self.settings.blocked_users:
            return False
        return not self.settings.slack_team_ids or team in self.settings.slack_team_ids


def home_view(
    settings: Settings, conversation: str | None, notice: str | None = None, *, persona: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The Home tab: what the bot is, how to talk to it, its settings commands (and the persona
    given in the person's DM), what it keeps, and the forget button."""
    if settings.memory_ttl > 0:
        kept = f"deleted after {_duration(settings.memory_ttl)} without a new message"
    else:
        kept = "kept until someone asks me to forget them"
    blocks: list[Any] = [
        HeaderBlock(text="BlenderBot"),
        SectionBlock(text=MarkdownTextObject(text=(
            "I'm a chat bot answered by *BlenderBot*, a conversational model that runs on our own server "
            "(nothing you say goes to an outside AI service). I like small talk; I can be wrong or odd, "
            "so don't take my word for facts."
        ))),
        SectionBlock(text=MarkdownTextObject(text=(
            "*How to talk to me*\n"
            "• Write to me in *Messages*, or mention me in a channel: there I answer in a thread.\n"
            "• Say `reset` (or `forget`) in a conversation to make me forget it.\n"
            "• Rate a reply with the buttons under it: it tells the people running me what works. "
            "*Try again* under my latest reply gets you another answer instead."
        ))),
        SectionBlock(text=MarkdownTextObject(text=(
            "*My settings in a channel*\n"
            "• `/blenderbot persona <facts separated by |>` gives me a character there, "
            "`/blenderbot listen on` (or `off`) makes me answer every message there (or only mentions), "
            "`/blenderbot show` shows them, `/blenderbot reset` puts them back.\n"
            "• In a channel, workspace admins and owners can use them"
            + (" (and the people the bot's operators named)" if settings.slack_admin_users else "")
            + "; in our DM, you can give me a persona yourself."
            + (f"\n• In our DM my persona is: {to_slack_text(' | '.join(persona))}" if persona else "")
        ))),
        SectionBlock(text=MarkdownTextObject(text=(
            "*What I remember*\n"
            f"• The last {settings.memory_max_turns} exchanges of each conversation (our DM, or each channel "
            f"thread), {kept}.\n"
            "• Ratings (which reply, good or bad, who rated) are kept with the conversation and deleted with it. "
            "Names are not stored with the history."
        ))),
    ]
    if conversation is not None:
        blocks.append(ActionsBlock(elements=[ButtonElement(
            text="Forget my conversations",
            action_id=FORGET_ACTION,
            value=conversation,
            style="danger",
            confirm=ConfirmObject(
                title="Forget our conversations?",
                text="I will delete everything I remember of our direct messages, your ratings in them and the "
                     "persona you gave me there. "
                     "Channel threads are shared: say `reset` in one to forget it.",
                confirm="Forget",
                deny="Keep",
                style="danger",
            ),
        )]))
    if notice:
        blocks.append(ContextBlock(elements=[MarkdownTextObject(text=notice)]))
    return {"type": "home", "blocks": [block.to_dict() for block in blocks]}


def _parse_feedback(value: Any) -> tuple[str, ExchangeRef] | None:
    """`good|<exchange id>|<conversation>` as `reply_blocks` wrote it, or None."""
    if not isinstance(value, str):
        return None
    rating, _, rest = value.partition("|")
    exchange = _parse_exchange(rest)
    if rating not in THANKS or exchange is None:
        return None
    return rating, exchange


def _parse_exchange(value: Any) -> ExchangeRef | None:
    """`<exchange id>|<conversation>` as `reply_blocks` wrote it, or None."""
    if not isinstance(value, str):
        return None
    exchange_id, _, conversation = value.partition("|")
    if not _EXCHANGE_ID.fullmatch(exchange_id) or not conversation:
        return None
    return ExchangeRef(conversation, exchange_id)


def _fit(text: str) -> str:
    """Slack text cut to what a section block holds, never inside an entity such as `&amp;`.
    (An answer of at most 127 tokens, the model's limit, always fits; this is a guard.)"""
    if len(text) <= SECTION_LIMIT:
        return text
    cut = SECTION_LIMIT - 1
    entity = text.rfind("&", cut - 5, cut)
    return text[: entity if entity >= 0 else cut] + "\N{HORIZONTAL ELLIPSIS}"


def _team(body: dict[str, Any], event: dict[str, Any]) -> str:
    """The workspace an event or an action comes from, as conversation keys spell it."""
    team = body.get("team_id") or event.get("team") or (body.get("team") or {}).get("id")
    return team or (body.get("user") or {}).get("team_id") or "-"


def _duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"
