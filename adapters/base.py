"""What every platform adapter shares: the neutral message, the lifecycle the
runtime drives, the tracking of replies in flight, error-to-answer mapping, the
reset words and the one place that splits long replies.

An adapter's event handler takes the message's place in its conversation's
line first thing, synchronously (`engine.take_ticket`, see bot/locks.py), and
hands the ticket to `ReplyTasks.spawn`, which releases it however the reply
task ends (or at once if the task is refused), so a conversation never wedges.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bot.engine import Reply, ReplyEngine
from bot.errors import ReplyError
from bot.inbox import Claim, Inbox
from bot.locks import Ticket
from bot.memory import ExchangeRef

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong on my side. Please try again."
# A message that is only one of these (any case, trailing "." or "!") forgets the conversation.
RESET_WORDS = frozenset({"reset", "forget"})


def is_reset(text: str) -> bool:
    return text.strip().strip(".!").strip().lower() in RESET_WORDS


@dataclass(frozen=True)
class IncomingMessage:
    """A platform event, translated: what the engine needs to answer it."""

    platform: str  # "discord", "slack", "web", ...
    conversation: str  # e.g. "discord:<channel>", "slack:<team>:<channel>:<thread>"
    user: str  # platform user id, for rate limits and logs
    text: str  # mentions already resolved or stripped
    channel: str | None = None  # whose settings apply (persona): "discord:<channel>", "slack:<team>:<channel>"
    listened: bool = False  # not addressed to the bot: answered because the channel listens


class Undelivered(Exception):
    """An answer could not be delivered for a passing reason (the connection to the
    platform dropped, retries included): `answer_once` leaves the message to the inbox,
    which answers it again once its claim lapses, instead of marking it done. By then
    the answer is stored, so the same one goes out, and parts already out are not resent."""


class AdapterStartError(RuntimeError):
    """An adapter could not start for a reason the operator must fix (bad token,
    intent not enabled...): `str(error)` is one line, fit to print before exiting."""


class Adapter(Protocol):
    """The lifecycle `blender-chat run` drives, in this order: `mount(app)`,
    `start()`, then on shutdown `stop_accepting()`, `drain(deadline)`, `close()`;
    once started, `replay(claim)` for messages a stopped process left unanswered."""

    name: str

    def mount(self, app: web.Application) -> None:
        """Add the routes the platform sends events to (before the web server starts); a no-op for none."""

    async def start(self) -> None:
        """Connect; return once connected (or raise with a clear message)."""

    def replay(self, claim: Claim) -> None:
        """Answer and deliver a recorded message of this platform that its first handler
        left unanswered: take its place in line now (synchronously), answer in a task,
        and never post an answer that is already out (see bot/inbox)."""

    @property
    def connected(self) -> bool:
        """True while connected to the platform (for /readyz); False while reconnecting."""

    @property
    def failure(self) -> str | None:
        """Why the platform stopped for good after start-up (a revoked token...), one
        line for /healthz, which then fails so the process is restarted; else None."""

    def stop_accepting(self) -> None:
        """Ignore new messages from now on."""

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for replies in flight; True if all were sent."""

    async def close(self) -> None:
        """Disconnect and release everything."""


class ReplyTasks:
    """Replies in flight, as tasks: new ones refused once stopped, all awaited on drain.

    Platform libraries run each event handler as a task of their own and do
    not wait for them when closing; this is how an adapter does.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = True

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str | None = None, ticket: Ticket | None = None
    ) -> asyncio.Task[Any] | None:
        """Run `coro` as a tracked task; None (and `coro` closed) once stopped.
        `ticket` is released when the task ends, however it ends, or at once if refused."""
        if not self.accepting:
            coro.close()
            if ticket is not None:
                ticket.release()
            return None
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if ticket is not None:
            # Also when cancelled before its first step, where no `finally` inside it would run.
            task.add_done_callback(lambda _: ticket.release())
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("A reply task failed", exc_info=task.exception())

    def stop(self) -> None:
        self.accepting = False

    async def drain(self, timeout: float) -> bool:
        if not self._tasks:
            return True
        done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d replies were still running at the shutdown deadline", len(pending))
        return not pending

    def __len__(self) -> int:
        return len(self._tasks)


async def answer_once(inbox: Inbox, claim: Claim, work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` (answer one accepted message and deliver the answer), then mark the
    message done in the inbox. Also when it failed: that is a bug, and answering it
    again after every restart would not mend it. Not when a shutdown cut it short, nor
    when the platform could not be reached (`Undelivered`): then this process, the next
    one or another replica answers it once the claim lapses."""
    try:
        await work
    except asyncio.CancelledError:
        inbox.abandon(claim)
        raise
    except Undelivered as error:
        inbox.abandon(claim)
        if claim.recorded and inbox.store.durable:
            log.warning("%s; the inbox answers it again once its claim lapses (INBOX_LEASE=%gs)", error, inbox.lease)
        else:
            log.warning("%s; it is lost: the inbox did not record it", error)
        return
    except Exception:
        await inbox.finish(claim)
        raise
    await inbox.finish(claim)


async def answer(engine: ReplyEngine, message: IncomingMessage, ticket: Ticket | None = None) -> str | None:
    """The text to send back for `message`, or None for a deliberate silence (see `respond`)."""
    reply = await respond(engine, message, ticket)
    return None if reply is None else reply.text


async def respond(
    engine: ReplyEngine, message: IncomingMessage, ticket: Ticket | None = None, *, exchange_id: str | None = None
) -> Reply | None:
    """What to send back for `message` and the stored exchange it is (to rate it),
    or None for a deliberate silence.

    `ticket` is the message's place in line, taken at intake; `exchange_id` the
    exchange that answers it (an inbox entry's, see bot/inbox). Expected failures
    (busy, too long, timeout...) become their short message; anything else is a
    bug: logged with its traceback, and the user gets an apology, never
    exception text. Neither is an exchange to rate.
    """
    try:
        return await engine.respond(
            message.conversation, message.text, user=message.user, platform=message.platform, ticket=ticket,
            exchange_id=exchange_id, channel=message.channel, listened=message.listened,
        )
    except ReplyError as error:
        if getattr(error, "notify", True) is False:
            return None
        return Reply(error.user_message)
    except Exception:
        log.exception("Unexpected error answering a %s message in %s", message.platform, message.conversation)
        return Reply(APOLOGY)


async def redo(
    engine: ReplyEngine, exchange: ExchangeRef, user: str, platform: str, ticket: Ticket | None = None,
    channel: str | None = None,
) -> Reply | None:
    """"Try again" on the answer that is `exchange`, asked by `user`: a Reply naming its new
    exchange is the new answer, to show in place of the old one; a Reply without one says why
    there is none (not the latest answer, the rate limit...), to show apart, the old answer
    kept; None is a deliberate silence. `channel`: whose persona, as for a message.
    Errors are mapped as `respond` maps them."""
    try:
        return await engine.retry(
            exchange.conversation, exchange.id, user=user, platform=platform, ticket=ticket, channel=channel
        )
    except ReplyError as error:
        if getattr(error, "notify", True) is False:
            return None
        return Reply(error.user_message)
    except Exception:
        log.exception("Unexpected error redoing a %s answer in %s", platform, exchange.conversation)
        return Reply(APOLOGY)


async def forget(
    engine: ReplyEngine, conversation: str, confirmation: str, ticket: Ticket | None = None, *, dm: bool = False
) -> str:
    """Forget a conversation (`reset`/`forget`/`/reset`), in line; the text to send back.
    `dm`: a person's own DM with the bot, whose channel settings (its persona) go too."""
    try:
        await engine.reset(conversation, ticket=ticket, with_settings=dm)
    except Exception:
        log.exception("Could not reset conversation %s", conversation)
        return APOLOGY
    return confirmation


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into chunks of at most `limit` characters, in order.

    Prefers paragraph, then line, then sentence, then word boundaries; avoids
    cutting inside a ``` code block (a chunk that must cut one closes the fence
    and the next reopens it); avoids splitting a character from its combining
    marks. Always ends: every round takes at least one character of the text,
    with a hard cut when nothing else fits. Only whitespace at the cuts is lost.
    """
    if limit < 16:
        raise ValueError("limit too small to split sensibly")
    chunks: list[str] = []
    rest = text.strip()
    reopen = ""  # fence to reopen at the start of the next chunk
    while rest:
        piece = reopen + rest
        if len(piece) <= limit:
            chunks.append(piece)
            break
        # Past the reopened fence, so each round consumes some of `rest` (reopen is short, see below).
        cut = max(_best_cut(piece, limit - 4), len(reopen) + 1)  # room to close a fence
        chunk, rest = piece[:cut].rstrip(), piece[cut:].lstrip()
        reopen = ""
        fence = _open_fence(chunk)
        if fence is not None:
            chunk += "\n```"
            # A fence line too long to repeat (its "language" is text) is reopened bare.
            reopen = (fence if len(fence) <= limit // 4 else "```") + "\n"
        if chunk.strip():
            chunks.append(chunk)
    return chunks


_FENCE = re.compile(r"^```[^\n`]*$", re.MULTILINE)


def _open_fence(chunk: str) -> str | None:
    """The opening line of a code fence left open at the end of `chunk`, if any."""
    fences = _FENCE.findall(chunk)
    if len(fences) % 2 == 1:
        return fences[-1]
    return None


def _best_cut(text: str, limit: int) -> int:
    window = text[:limit]
    # A fence opened in this window and closed after it: cut before the fence if that is not too early.
    fences = list(_FENCE.finditer(window))
    if len(fences) % 2 == 1 and fences[-1].start() > limit // 3:
        return fences[-1].start()
    for pattern in (r"\n\s*\n", r"\n", r"[.!?…](?=\s)", r"\s"):
        matches = [m.end() for m in re.finditer(pattern, window)]
        good = [end for end in matches if end > limit // 3]
        if good:
            return good[-1]
    return _grapheme_safe(text, limit)


# Longest run of combining marks and joiners a cut steps back over; past it (a
# "zalgo" text) the cut is made where it falls.
MAX_CLUSTER = 32


def _grapheme_safe(text: str, cut: int) -> int:
    """Move a cut left so it does not separate a character from its combining
    marks, variation selectors or zero-width joiners (emoji sequences)."""
    floor = max(1, cut - MAX_CLUSTER)
    moved = cut
    while moved > floor and _joins_previous(text, moved):
        moved -= 1
    return cut if _joins_previous(text, moved) else moved


def _joins_previous(text: str, cut: int) -> bool:
    """True if `text[cut]` belongs to the same character as `text[cut - 1]`."""
    char = text[cut]
    return bool(
        unicodedata.combining(char) or char in "\u200d\ufe0e\ufe0f" or text[cut - 1] == "\u200d"
        or "\U0001f3fb" <= char <= "\U0001f3ff"
    )
