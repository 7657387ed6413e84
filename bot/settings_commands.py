"""The verbs of `/blenderbot` (Discord, Slack) and `/persona` (the terminal): a
channel's persona, listening on or off, show, reset, each answered with one short
text fit to show the person who asked. Who may use them is the adapters' business;
what they change is the engine's (`ReplyEngine.set_persona`...); this is only the
words, so that every surface says the same.
"""

from __future__ import annotations

from bot.engine import ReplyEngine
from bot.errors import PersonaRefused
from bot.memory import StoreUnavailable

COMMAND = "/blenderbot"
VERBS = ("persona", "listen", "show", "reset")
USAGE = (
    f"`{COMMAND} persona <facts separated by |>` gives me a character in this channel, "
    f"`{COMMAND} listen on` (or `off`) makes me answer every message here (or only those for me), "
    f"`{COMMAND} show` shows this channel's settings, `{COMMAND} reset` puts them back to the defaults."
)
NOT_SAVED = "Sorry, I could not reach my memory to change that just now; nothing was changed. Please try again."
NOT_READ = "Sorry, I could not read my settings here just now. Please try again."
NO_PERSONA_TEXT = (
    "Write the persona after the verb, its facts separated by |, "
    f"e.g. `{COMMAND} persona I love hiking | I have a dog`."
)


async def set_persona(engine: ReplyEngine, channel: str, text: str) -> str:
    if not text.strip():
        return NO_PERSONA_TEXT
    try:
        persona = await engine.set_persona(channel, text)
    except PersonaRefused as refused:
        return str(refused)
    except StoreUnavailable:
        return NOT_SAVED
    return "Done: my persona here is now: " + " | ".join(persona)


async def set_listening(engine: ReplyEngine, channel: str, on: bool, *, note: str = "") -> str:
    """`note`: what the platform adds to a confirmation of listening on (what it needs)."""
    try:
        await engine.set_listening(channel, on)
    except StoreUnavailable:
        return NOT_SAVED
    if on:
        return ("Done: I answer every message in this channel now (not other bots', nor messages that reply to "
                "or mention someone else)." + (f" {note}" if note else ""))
    return "Done: in this channel I answer only messages that mention me or reply to me now."


async def show(engine: ReplyEngine, channel: str, *, where: str = "This channel's", listening: bool = True) -> str:
    """`listening`: whether listening applies there (not in a DM, the web chat, the terminal)."""
    try:
        settings = await engine.channel_settings(channel)
    except StoreUnavailable:
        return NOT_READ
    if settings.persona:
        persona = "its own: " + " | ".join(settings.persona)
    elif engine.settings.persona:
        persona = "the default (PERSONA): " + " | ".join(engine.settings.persona)
    else:
        persona = "none"
    shown = f"{where} settings:\n• Persona: {persona}"
    if listening:
        shown += "\n• Listening: " + ("on: I answer every message" if settings.listen else
                                      "off: I answer messages that mention me")
    return shown


async def reset(engine: ReplyEngine, channel: str) -> str:
    try:
        had = await engine.reset_settings(channel)
    except StoreUnavailable:
        return NOT_SAVED
    if not had:
        return "Nothing to reset: the default settings apply here already."
    return "Done: the default settings apply here again (the default persona, listening off)."


async def run(engine: ReplyEngine, channel: str, text: str, *, listen_refusal: str | None = None,
              listen_note: str = "") -> str:
    """A command written as text (Slack's `/blenderbot listen on`): its verb, then its argument.
    `listen_refusal`: why listening cannot be turned on here, if it cannot."""
    verb, _, rest = text.strip().partition(" ")
    verb, rest = verb.lower(), rest.strip()
    if verb == "persona":
        return await set_persona(engine, channel, rest)
    if verb == "listen" and rest.lower() in ("on", "off"):
        if rest.lower() == "on" and listen_refusal:
            return listen_refusal
        return await set_listening(engine, channel, rest.lower() == "on", note=listen_note)
    if verb == "show" and not rest:
        return await show(engine, channel)
    if verb == "reset" and not rest:
        return await reset(engine, channel)
    return "I know these: " + USAGE
