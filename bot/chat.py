"""`blender-chat chat`: talk to the bot in the terminal, with the same engine and memory."""

from __future__ import annotations

import asyncio
import sys
import threading

from bot import settings_commands
from bot.engine import NO_ANSWER, ReplyEngine
from bot.errors import ReplyError
from bot.memory import BAD, GOOD, Exchange, ExchangeRef, StoreUnavailable
from bot.text import clean_text

HELP = (
    "Type a message and press Enter. /good or /bad rates the last reply, /again tries another answer to your "
    "last message, /persona shows my persona here, /persona I love hiking | I have a dog gives me one, /persona off "
    "puts back the default, /reset (or /forget) forgets this conversation and its persona, /quit (or Ctrl-D) leaves."
)
RATINGS = {"/good": GOOD, "/bad": BAD}
# How many remembered exchanges are shown when a conversation is resumed.
SHOWN_ON_RESUME = 3


async def chat(engine: ReplyEngine, conversation: str) -> None:
    lines = _stdin_lines()
    history = await engine.history(conversation)
    _show_resumed(conversation, history)
    print(HELP)
    # The reply /good and /bad rate: on resuming, the last one remembered.
    last = ExchangeRef(conversation, history[-1].id) if history else None
    while True:
        print("you> ", end="", flush=True)
        line = await lines.get()
        if line is None or line.strip() in ("/quit", "/exit"):
            print()
            return
        command = line.strip()
        if command in ("/reset", "/forget"):
            await engine.reset(conversation, with_settings=True)  # the person's own conversation, like a DM
            last = None
            print("bot> (conversation forgotten)")
        elif command == "/persona" or command.startswith("/persona "):
            print(f"bot> ({await _persona(engine, conversation, command.removeprefix('/persona').strip())})")
        elif command in RATINGS:
            print(f"bot> {await _rate(engine, last, RATINGS[command])}")
        elif command == "/again":
            if last is None:
                print("bot> (no reply to redo yet)")
                continue
            try:
                reply = await engine.retry(
                    conversation, last.id, user="terminal", platform="terminal", channel=conversation
                )
                answer, last = reply.text, reply.exchange
            except ReplyError as error:
                answer = f"({error.user_message})"
            print(f"bot> {answer}", flush=True)
        elif command == "/help":
            print(HELP)
        elif command:
            try:
                reply = await engine.respond(
                    conversation, line, user="terminal", platform="terminal", channel=conversation
                )
                answer, last = reply.text, reply.exchange
            except ReplyError as error:
                answer = error.user_message
            print(f"bot> {answer}", flush=True)


def _show_resumed(conversation: str, history: list[Exchange]) -> None:
    """Where a resumed conversation left off: its last few exchanges, as they were shown."""
    if not history:
        return
    shown = history[-SHOWN_ON_RESUME:]
    which = "" if len(shown) == len(history) else f"; the last {len(shown)}"
    exchanges = "1 earlier exchange" if len(history) == 1 else f"{len(history)} earlier exchanges"
    print(f"(resuming conversation {conversation!r}: {exchanges} remembered{which})")
    for exchange in shown:
        print(f"you> {exchange.user}")
        print(f"bot> {clean_text(exchange.bot) or NO_ANSWER}")


async def _rate(engine: ReplyEngine, exchange: ExchangeRef | None, rating: str) -> str:
    if exchange is None:
        return "(no reply to rate yet)"
    try:
        stored = await engine.rate(exchange, rating, user="terminal", platform="terminal")
    except StoreUnavailable:
        return "(the rating could not be stored)"
    return f"(thanks: last reply rated {rating})" if stored else "(that reply is no longer remembered)"


async def _persona(engine: ReplyEngine, conversation: str, text: str) -> str:
    """`/persona`: show this conversation's persona; `/persona <facts>`: set it; `/persona off`: the default."""
    if not text:
        return await settings_commands.show(engine, conversation, where="This conversation's", listening=False)
    if text.lower() in ("off", "reset", "default"):
        return await settings_commands.reset(engine, conversation)
    return await settings_commands.set_persona(engine, conversation, text)


def _stdin_lines() -> asyncio.Queue[str | None]:
    """Lines of standard input, read on a daemon thread so the event loop (and
    the model's batches) never wait on the keyboard; None marks the end (Ctrl-D)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return queue
