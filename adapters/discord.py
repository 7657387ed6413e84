"""The Discord adapter: discord.py events in, `engine.reply` answers out.

Answers messages that mention the bot, replies to its own messages (not
forwards of them) and DMs; `/reset` and `/help` are slash commands and "Ask
BlenderBot" a message context menu, all usable wherever the app is installed (a
server, or a user's account). 👍 / 👎 reactions on its replies are ratings
(adapters/discord_feedback.py); 🔁 on its latest reply in a channel is "try again":
another answer, edited into that reply. Needs only Discord's default (non-privileged)
intents: mentions, replies and DMs carry their content, and so do the bot's own
messages.

`/blenderbot persona|listen|show|reset` change a channel's settings
(adapters/discord_settings.py); a channel's persona goes with its answers. In a channel
set to listen, the bot answers every message, not only those addressed to it (not other
bots', nor messages said to someone else), which needs the privileged Message Content
intent (DISCORD_MESSAGE_CONTENT=on): without it Discord blanks those messages.

Each message takes its place in its channel's line as it arrives
(before the typing indicator, which runs alongside the reply), so a channel's
messages are answered and sent in the order they were written.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
from typing import Any

import aiohttp
import discord
import yarl
from aiohttp import web
from discord import app_commands

from adapters.base import (
    AdapterStartError,
    IncomingMessage,
    ReplyTasks,
    Undelivered,
    answer_once,
    forget,
    is_reset,
    redo,
    respond,
    split_message,
)
from adapters.discord_feedback import RepliesSent, exchange_answering, is_again, rating_for
from adapters.discord_settings import SettingsCommands, interaction_settings_key, settings_key
from bot.config import Settings
from bot.engine import ReplyEngine
from bot.errors import EngineClosed
from bot.inbox import Claim, Entry, Inbox, exchange_id_for
from bot.locks import Ticket
from bot.memory import StoreUnavailable

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters per Discord message; longer ones are refused with 400
RESET_DONE = "Done: I've forgotten our conversation in this channel. Let's start fresh!"
NOT_HERE = "I'm not enabled here."
# Without the Message Content intent Discord blanks replies that do not @mention the bot.
CANNOT_READ = "I can't read that message: Discord only shows me messages that mention me. Mention me and ask again!"
HELP_TEXT = (
    "I'm a chat bot answered by BlenderBot, a conversational model running on my own server.\n"
    "- Mention me (@me) in a channel, reply to one of my messages, or DM me, and I'll answer.\n"
    "- Right-click (or long-press) any message -> Apps -> **Ask BlenderBot** and I answer it; where I'm not "
    "a member, only you see the answer.\n"
    "- Each channel and each thread is its own conversation, and I remember it.\n"
    "- `/reset` (or mention me with just `reset`) makes me forget this channel's conversation.\n"
    "- React with 👍 or 👎 on my replies to tell the people running me what works, and with 🔁 on my latest "
    "reply to get another answer instead.\n"
    "- People who can manage a channel give me a character there, or let me answer every message in it: "
    "`/blenderbot persona`, `/blenderbot listen on|off`, `/blenderbot show`, `/blenderbot reset`.\n"
    "I can be wrong or odd: don't take my word for facts."
)
ASK_COMMAND = "Ask BlenderBot"
NOTHING_TO_ASK = "That message has no text I can answer."
PRIVILEGED_INTENT_HELP = (
    "Discord refused the privileged Message Content intent: enable the Message Content intent at "
    "https://discord.com/developers/applications -> your app -> Bot -> Privileged Gateway Intents, "
    "or unset DISCORD_MESSAGE_CONTENT"
)
START_TIMEOUT = 60.0  # seconds from start() to READY before giving up
# A post whose connection dropped is sent again with its nonce (Discord answers a repeat
# with the message it created, if it did), this many times in all, waiting a bit longer each time.
SEND_ATTEMPTS = 3
SEND_RETRY_DELAY = 0.5  # seconds before the second attempt; doubled for each later one
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
HISTORY_LIMIT = 100  # messages after the user's read by a replay, to find its answer sent before a restart
CHUNKS_BACK = 20  # messages before a rated later chunk read to find the first chunk of its answer

# Plain messages and replies; the other types are system notices (joins, pins, thread starts...).
_ANSWERED_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")


class DiscordAdapter:
    """One discord.py client (sharded when DISCORD_SHARD_COUNT is set) driven by
    the runtime's lifecycle: start, stop_accepting, drain, close."""

    name = "discord"

    def __init__(self, settings: Settings, engine: ReplyEngine, inbox: Inbox | None = None) -> None:
        if not settings.discord_token:
            raise ValueError("DiscordAdapter needs DISCORD_TOKEN")
        _route_endpoints_per_context()
        self.settings = settings
        self.engine = engine
        # Each message is recorded as it arrives, so that a crash does not lose it (bot/inbox).
        self.inbox = inbox or Inbox.in_process(settings, engine.metrics)
        self._replies = ReplyTasks()
        self._ready = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._context = contextvars.copy_context()
        self._sent = RepliesSent()  # which exchange each recent reply message is, for reactions
        self._failure: str | None = None
        self._closing = False
        self._client = self._build_client()
        self._tree = self._build_commands(self._client)

    # -- lifecycle -------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        """Nothing to add: Discord's events come over the gateway."""

    async def start(self) -> None:
        # The endpoints are set in the context of the client's own task: every task it
        # spawns (event handlers, replies, shards) inherits them, nothing else sees them.
        context = contextvars.copy_context()
        context.run(_api_base.set, self.settings.discord_api_url.rstrip("/"))
        context.run(_gateway.set, yarl.URL(self.settings.discord_gateway_url))
        self._context = context  # replays run in it too (they do not come from the client)
        self._runner = asyncio.create_task(self._run(), name="discord-client", context=context)
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({self._runner, ready}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # shut down while connecting
            await self.close()
            raise
        finally:
            ready.cancel()
        if self._runner.done():
            error = None if self._runner.cancelled() else self._runner.exception()
            await self._client.close()
            raise _start_error(error, self.settings) from error
        if not self._ready.is_set():
            await self.close()
            raise AdapterStartError(
                f"Discord did not finish connecting within {START_TIMEOUT:g}s "
                f"(gateway {self.settings.discord_gateway_url})"
            )
        self._runner.add_done_callback(self._runner_ended)

    @property
    def connected(self) -> bool:
        client = self._client
        if self._runner is None or self._runner.done() or client.is_closed() or not client.is_ready():
            return False
        if isinstance(client, discord.AutoShardedClient):
            return all(not shard.is_closed() for shard in client.shards.values())
        return client.ws is not None and client.ws.open

    @property
    def failure(self) -> str | None:
        """Why the client stopped for good after start-up (a reset token, a fatal
        close code), for /healthz; None while it runs or reconnects."""
        return self._failure

    def stop_accepting(self) -> None:
        self._replies.stop()

    async def drain(self, timeout: float) -> bool:
        return await self._replies.drain(timeout)

    async def close(self) -> None:
        self._replies.stop()
        self._closing = True
        await self._client.close()
        if self._runner is not None and not self._runner.done():
            # connect() returns once the client is closed; do not wait forever if it does not.
            _, pending = await asyncio.wait({self._runner}, timeout=10)
            for task in pending:
                task.cancel()

    async def _run(self) -> None:
        client = self._client
        await client.login(self.settings.discord_token or "")
        # With several processes sharing the shards, the one holding shard 0 registers the commands.
        if not self.settings.discord_shard_ids or 0 in self.settings.discord_shard_ids:
            await self._sync_commands()
        await client.connect(reconnect=True)

    def _runner_ended(self, task: asyncio.Task[None]) -> None:
        """discord.py reconnects by itself and gives up only for good (a fatal close
        code such as 4004 after a token reset): one line, and /healthz fails from now on."""
        if task.cancelled() or self._closing:
            return
        error = task.exception()
        self._failure = str(_start_error(error, self.settings)) if error else "the Discord client stopped by itself"
        log.error("Discord stopped for good: %s; /healthz fails from now on, so the bot gets restarted", self._failure)

    # -- building the client ----------------------------------------------

    def _build_client(self) -> discord.Client:
        # The bot has no voice: discord.py's warnings that voice's libraries are missing are noise.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        # Only what answering needs, all non-privileged: the guild and channel cache, messages,
        # and reactions (ratings). The other default intents (typing, voice...) are traffic we ignore.
        intents = discord.Intents.none()
        intents.guilds = intents.guild_messages = intents.dm_messages = True
        intents.guild_reactions = intents.dm_reactions = True
        intents.message_content = self.settings.discord_message_content
        options: dict[str, Any] = {"intents": intents, "allowed_mentions": discord.AllowedMentions.none()}
        if self.settings.discord_shard_count is not None:
            client: discord.Client = discord.AutoShardedClient(
                shard_count=self.settings.discord_shard_count,
                shard_ids=list(self.settings.discord_shard_ids) or None,
                **options,
            )
        else:
            client = discord.Client(**options)

        async def on_ready() -> None:
            user = client.user
            log.info("Connected to Discord as %s (id %s) in %d servers", user, user and user.id, len(client.guilds))
            self._ready.set()

        async def on_message(message: discord.Message) -> None:
            self._on_message(message)

        async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
            # The raw event: it comes for messages not in the cache too (older replies).
            self._on_reaction(payload)

        client.event(on_ready)
        client.event(on_message)
        client.event(on_raw_reaction_add)
        return client

    def _build_commands(self, client: discord.Client) -> app_commands.CommandTree:
        # Every command works wherever the app is: installed in a server, or to a user's
        # account (then also in DMs and group DMs the bot is no member of).
        tree = app_commands.CommandTree(
            client,
            allowed_installs=app_commands.AppInstallationType(guild=True, user=True),
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True),
        )

        async def reset(interaction: discord.Interaction) -> None:
            # In line now, before any await: after the messages that came before it.
            ticket = self.engine.take_ticket(_interaction_conversation(interaction))
            await self._command(interaction, self._reset_command(interaction, ticket), ticket)

        async def help_command(interaction: discord.Interaction) -> None:
            await self._command(interaction, interaction.response.send_message(HELP_TEXT, ephemeral=True))

        for name, description, callback in (
            ("reset", "Forget this channel's conversation", reset),
            ("help", "What I am and how to talk to me", help_command),
        ):
            tree.add_command(app_commands.Command(name=name, description=description, callback=callback))

        async def ask(interaction: discord.Interaction, message: discord.Message) -> None:
            ticket = self.engine.take_ticket(_interaction_conversation(interaction))
            await self._command(interaction, self._ask_command(interaction, message, ticket), ticket)

        tree.add_command(app_commands.ContextMenu(name=ASK_COMMAND, callback=ask))
        tree.add_command(SettingsCommands(self.settings, self.engine, self._command, _bot_is_member).group())
        return tree

    async def _sync_commands(self) -> None:
        try:
            await self._tree.sync()
        except discord.HTTPException as error:
            # Mentions and DMs work without them: not worth failing start-up for.
            log.warning("Could not register the app commands (%s %s)", error.status, error.text)

    # -- messages ----------------------------------------------------------

    def _on_message(self, message: discord.Message) -> None:
        if not self._replies.accepting:
            return
        answerable = self._text_to_answer(message)
        if answerable is not None:
            text, listened = answerable
            conversation = f"discord:{message.channel.id}"
            # Its place in the channel's line, now: gateway events arrive in order, and nothing has awaited yet.
            ticket = self.engine.take_ticket(conversation)
            in_dm = isinstance(message.channel, discord.DMChannel)
            entry = Entry(
                key=_message_key(message.id), platform="discord", conversation=conversation,
                user=str(message.author.id), text=text,
                route={"channel": message.channel.id, "message": message.id, "dm": in_dm,
                       "unreadable": _unreadable(message, in_dm, self.settings),
                       "settings": settings_key(message.channel), "listened": listened},
            )  # fmt: skip
            self._replies.spawn(self._take(message, entry, ticket), name=f"discord-reply-{message.id}", ticket=ticket)

    async def _take(self, message: discord.Message | discord.PartialMessage, entry: Entry, ticket: Ticket) -> None:
        if entry.route.get("listened") and not await self.engine.listening(entry.route["settings"]):
            return  # a message not for the bot, in a channel that does not listen
        claim = await self.inbox.accept(entry)
        if claim is not None:
            await answer_once(self.inbox, claim, self._respond(message, claim, ticket))

    def replay(self, claim: Claim) -> None:
        """Answer a message a stopped process left unanswered, in the conversation's line.
        The chunks of its answer already in the channel are not sent again (see `_send`)."""
        entry = claim.entry
        ticket = self.engine.take_ticket(entry.conversation, arrived=entry.arrived)  # ahead of later messages
        channel_id, message_id = int(entry.route["channel"]), int(entry.route["message"])
        kind = discord.ChannelType.private if entry.route.get("dm") else None
        channel = self._client.get_partial_messageable(channel_id, type=kind)
        work = answer_once(self.inbox, claim, self._respond(channel.get_partial_message(message_id), claim, ticket))
        # In a copy of the client's context, which says where Discord's API is.
        self._context.copy().run(self._replies.spawn, work, name=f"discord-replay-{message_id}", ticket=ticket)

    def _text_to_answer(self, message: discord.Message) -> tuple[str, bool] | None:
        """What the model should see, and whether it is only overheard (not addressed to the
        bot: answered if the channel listens); None when the bot should stay silent."""
        me = self._client.user
        author = message.author
        if me is None or author.id == me.id or author.bot or message.webhook_id is not None:
            return None
        if str(author.id) in self.settings.blocked_users:
            return None  # silence, not even typing; and no `forget` of a channel others talk in
        if message.type not in _ANSWERED_TYPES or _is_forward(message):
            return None  # a forward passes someone's message along: it is not said to the bot
        if isinstance(message.channel, discord.DMChannel):
            if not self.settings.discord_dms:
                return None
            return _model_text(message, me.id), False
        if not self._allowed_here(_guild_id(message), message.channel):
            return None
        if _addressed_to(message, me.id):
            return _model_text(message, me.id), False
        # Without the Message Content intent an overheard message has no text: nothing to listen to.
        if not self.settings.discord_message_content or _addressed_to_others(message, me.id):
            return None
        text = _model_text(message, me.id)
        return (text, True) if text else None

    def _allowed_here(self, guild_id: int | None, channel: Any) -> bool:
        guilds, channels = self.settings.discord_guild_ids, self.settings.discord_channel_ids
        if guilds and str(guild_id) not in guilds:
            return False
        # A thread is allowed when it or its parent channel is listed.
        ids = {str(getattr(channel, "id", "")), str(getattr(channel, "parent_id", ""))}
        return not channels or bool(ids & channels)

    async def _respond(self, message: discord.Message | discord.PartialMessage, claim: Claim, ticket: Ticket) -> None:
        """Answer `message` and send the answer, holding its place in line until sent."""
        entry = claim.entry
        conversation, text = ticket.conversation, entry.text
        if entry.route.get("unreadable"):
            await self._send(message, [CANNOT_READ], claim)
            return
        listened = bool(entry.route.get("listened"))
        if is_reset(text) and not listened:
            done = await forget(self.engine, conversation, RESET_DONE, ticket, dm=bool(entry.route.get("dm")))
            await self._send(message, [done], claim)
            return
        # Entries recorded before channel settings existed have no "settings": the channel's own key.
        channel = entry.route.get("settings") or f"discord:{entry.route['channel']}"
        incoming = IncomingMessage("discord", conversation, entry.user, text, channel=channel, listened=listened)
        # Alongside the reply, not before it: a slow or rate-limited typing POST must not delay the answer.
        typing = asyncio.create_task(_show_typing(message.channel), name=f"discord-typing-{message.id}")
        try:
            reply = await respond(self.engine, incoming, ticket, exchange_id=entry.exchange_id)
        finally:
            typing.cancel()  # a typing POST still waiting would show "typing..." after the answer
            await asyncio.gather(typing, return_exceptions=True)
        if reply and reply.text:
            sent = await self._send(message, split_message(reply.text, MESSAGE_LIMIT), claim)
            if reply.exchange is not None:
                self._sent.remember(sent, reply.exchange)

    async def _send(
        self, message: discord.Message | discord.PartialMessage, chunks: list[str], claim: Claim
    ) -> list[int]:
        """The first chunk replies to `message`; the rest follow it in order. The ids of those sent.
        Each chunk has a nonce of its own made from the message's key: a chunk sent again soon (a
        retry, a replay after a crash) comes back as the message Discord already has, not a second
        one. Discord remembers nonces for a few minutes only, less than INBOX_MAX_AGE: a replayed
        message first reads which chunks the channel has already and sends only the others."""
        entry = claim.entry
        # If the message was deleted meanwhile, still answer, just without the reference.
        reference = message.to_reference(fail_if_not_exists=False)
        posted = await self._chunks_posted(message, chunks) if claim.replayed else set()
        if posted:
            self.inbox.count_duplicate("discord")
            log.info("%d chunks of an answer in channel %s were sent before a restart: not sending them again",
                     len(posted), message.channel.id)  # fmt: skip
        sent = []
        for index, chunk in enumerate(chunks):
            if index in posted:
                continue
            nonce = f"{entry.exchange_id[:21]}{index:03d}"  # Discord takes at most 25 characters
            try:
                created = await self._post(message.channel, chunk, reference if index == 0 else None, nonce)
            except discord.HTTPException as error:
                # Usually missing permissions in that channel: nothing more can be sent there.
                log.warning("Could not answer in channel %s (%s %s)", message.channel.id, error.status, error.text)
                break
            sent.append(created.id)
        return sent

    async def _chunks_posted(self, message: discord.Message | discord.PartialMessage, chunks: list[str]) -> set[int]:
        """Which of `chunks` the channel has already, read from the messages after `message`:
        the bot's reply to it (the first chunk), then the bot's next messages that are the
        next chunks. Nothing, with a warning, if the channel cannot be read (no Read Message
        History permission): then the answer is sent, at the risk of a second copy."""
        me = self._client.user
        try:
            after = [found async for found in message.channel.history(limit=HISTORY_LIMIT, after=message)]
        except (discord.HTTPException, *NETWORK_ERRORS) as error:
            log.warning("Could not read channel %s to see whether an answer was sent before a restart (%s); "
                        "sending it", message.channel.id, error)  # fmt: skip
            return set()
        mine = [found for found in after if me is not None and found.author.id == me.id]  # oldest first
        first = next((i for i, found in enumerate(mine) if _replies_to(found, message.id)), None)
        if first is None:
            return set()
        posted = {0}
        for index, found in enumerate(mine[first + 1 : first + len(chunks)], start=1):
            if found.reference is not None or found.content != chunks[index]:
                break
            posted.add(index)
        return posted

    async def _post(
        self, channel: discord.abc.Messageable, chunk: str, reference: discord.MessageReference | None, nonce: str
    ) -> discord.Message:
        """Send one chunk; a dropped connection is tried again with the same nonce, so a chunk
        that Discord created before the drop comes back instead of being sent twice. Raises
        `Undelivered` when every attempt failed: the inbox answers the message again later."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                return await channel.send(chunk, reference=reference, nonce=nonce)
            except NETWORK_ERRORS as error:
                if attempt == SEND_ATTEMPTS:
                    raise Undelivered(
                        f"Could not reach Discord to answer in channel {getattr(channel, 'id', '?')} "
                        f"({SEND_ATTEMPTS} attempts, last: {type(error).__name__}: {error})"
                    ) from error
                log.info("Sending an answer failed (%s: %s); sending it again with its nonce",
                         type(error).__name__, error)  # fmt: skip
                await asyncio.sleep(SEND_RETRY_DELAY * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    # -- reactions: ratings of replies -------------------------------------

    def _on_reaction(self, payload: discord.RawReactionActionEvent) -> None:
        me = self._client.user
        emoji = (payload.emoji.name or "") if payload.emoji.is_unicode_emoji() else ""
        rating, again = rating_for(emoji), is_again(emoji)
        if (rating is None and not again) or me is None or payload.user_id == me.id or not self._replies.accepting:
            return
        # Discord says whose message it is; only the bot's replies are rated.
        if payload.message_author_id is not None and payload.message_author_id != me.id:
            return
        if (payload.member is not None and payload.member.bot) or str(payload.user_id) in self.settings.blocked_users:
            return
        channel = self._client.get_channel(payload.channel_id) or discord.Object(payload.channel_id)
        if payload.guild_id is not None and not self._allowed_here(payload.guild_id, channel):
            return
        if again:
            # In the conversation's line now, before any await, like a message.
            known = self._sent.get(payload.message_id)
            ticket = self.engine.take_ticket(known.conversation if known else f"discord:{payload.channel_id}")
            self._replies.spawn(self._again(payload, ticket), name=f"discord-again-{payload.message_id}", ticket=ticket)
            return
        assert rating is not None
        self._replies.spawn(self._rate(payload, rating), name=f"discord-rating-{payload.message_id}")

    async def _rate(self, payload: discord.RawReactionActionEvent, rating: str) -> None:
        exchange = self._sent.get(payload.message_id) or await self._exchange_of(payload)
        if exchange is None:
            return  # not a reply the bot remembers (a notice, or a forgotten conversation)
        try:
            await self.engine.rate(exchange, rating, user=str(payload.user_id), platform="discord")
        except StoreUnavailable:
            pass  # logged by the engine; the reaction stays on Discord

    async def _again(self, payload: discord.RawReactionActionEvent, ticket: Ticket) -> None:
        """🔁: another answer, edited into the reply reacted to; or a reply saying why not."""
        exchange = self._sent.get(payload.message_id) or await self._exchange_of(payload)
        if exchange is None or exchange.conversation != ticket.conversation:
            return  # not a reply the bot remembers (a notice, or a forgotten conversation)
        message = self._client.get_partial_messageable(payload.channel_id).get_partial_message(payload.message_id)
        # The channel's persona, as for a message there (a thread's is its parent's, when cached).
        channel = settings_key(self._client.get_channel(payload.channel_id) or discord.Object(payload.channel_id))
        reply = await redo(self.engine, exchange, str(payload.user_id), "discord", ticket, channel=channel)
        if reply is None or not reply.text:
            return
        try:
            if reply.exchange is None:  # refused (not the latest answer, the rate limit...): say why, under it
                await message.channel.send(reply.text, reference=message.to_reference(fail_if_not_exists=False))
                return
            first, *rest = split_message(reply.text, MESSAGE_LIMIT)
            await message.edit(content=first)
            sent = [payload.message_id] + [(await message.channel.send(chunk)).id for chunk in rest]
        except discord.HTTPException as error:
            # The new answer is stored; the old text stays on Discord (deleted meanwhile, or no permission).
            log.warning("Could not show a redone answer in channel %s (%s %s)", payload.channel_id, error.status,
                        error.text)
            return
        self._sent.remember(sent, reply.exchange)

    async def _exchange_of(self, payload: discord.RawReactionActionEvent) -> Any:
        """A reply not sent by this process (or long ago): the exchange answering the message
        it (or the first chunk of its answer) replies to, or the interaction it answers."""
        me = self._client.user
        channel = self._client.get_partial_messageable(payload.channel_id)
        try:
            message = await channel.fetch_message(payload.message_id)
            if me is None or message.author.id != me.id or not message.content:
                return None
            key = await self._key_answered_by(message, me.id)
        except (discord.HTTPException, *NETWORK_ERRORS) as error:
            log.debug("Could not read a rated message in channel %s: %s", payload.channel_id, error)
            return None
        if key is None:
            return None
        conversation = f"discord:{payload.channel_id}"
        history = await self.engine.history(conversation)
        return exchange_answering(history, exchange_id_for(key), message.content, conversation, MESSAGE_LIMIT)

    async def _key_answered_by(self, reply: discord.Message, my_id: int) -> str | None:
        """The key of what the bot's `reply` answers: its own reference or interaction, else
        (a later chunk of an answer) those of the first chunk, the bot's nearest earlier
        message that has one."""
        key = _key_answered(reply)
        if key is not None or reply.reference is not None:
            return key
        async for earlier in reply.channel.history(limit=CHUNKS_BACK, before=reply):
            if earlier.author.id == my_id and (earlier.reference is not None or earlier.interaction_metadata):
                return _key_answered(earlier)
        return None

    # -- slash commands ----------------------------------------------------

    async def _command(self, interaction: discord.Interaction, work: Any, ticket: Ticket | None = None) -> None:
        """Run a command's `work` as a tracked reply, or refuse it when not welcome."""
        if not self._interaction_allowed(interaction):
            work.close()
            if ticket is not None:
                ticket.release()
            await interaction.response.send_message(NOT_HERE, ephemeral=True)
            return
        task = self._replies.spawn(work, name=f"discord-command-{interaction.id}", ticket=ticket)
        if task is None:
            await interaction.response.send_message(EngineClosed.user_message, ephemeral=True)
            return
        await task

    async def _reset_command(self, interaction: discord.Interaction, ticket: Ticket) -> None:
        # Resetting waits for a reply in flight in the channel; Discord wants an answer within 3 s.
        private = not _bot_is_member(interaction)
        await interaction.response.defer(thinking=True, ephemeral=private)
        # In the bot's own DM the person forgets their data: the DM's settings (its persona) too.
        in_dm = bool(interaction.context.dm_channel)
        confirmation = await forget(self.engine, ticket.conversation, RESET_DONE, ticket, dm=in_dm)
        await interaction.followup.send(confirmation, ephemeral=private)

    async def _ask_command(self, interaction: discord.Interaction, message: discord.Message, ticket: Ticket) -> None:
        """"Ask BlenderBot" on a message: answer its text. Only the asker sees the answer where
        the bot is no member (a user install in someone else's server, DM or group DM)."""
        private = not _bot_is_member(interaction)
        # Deferred first: the model takes longer than Discord's 3 seconds.
        await interaction.response.defer(thinking=True, ephemeral=private)
        me = self._client.user
        text = _model_text(message, me.id) if me is not None else message.content
        if not text:
            await interaction.followup.send(NOTHING_TO_ASK, ephemeral=private)
            return
        # The channel's persona where the bot is a member; elsewhere nobody there chose one.
        channel = interaction_settings_key(interaction) if not private else None
        incoming = IncomingMessage("discord", ticket.conversation, str(interaction.user.id), text, channel=channel)
        # Named after the interaction, which its answer's messages carry: a rating of them finds it.
        exchange_id = exchange_id_for(_interaction_key(interaction.id))
        reply = await respond(self.engine, incoming, ticket, exchange_id=exchange_id)
        if reply is None or not reply.text:
            await interaction.delete_original_response()  # a deliberate silence: take "thinking..." away
            return
        sent = []
        for chunk in split_message(reply.text, MESSAGE_LIMIT):
            sent.append((await interaction.followup.send(chunk, ephemeral=private, wait=True)).id)
        if reply.exchange is not None and not private:
            self._sent.remember(sent, reply.exchange)

    def _interaction_allowed(self, interaction: discord.Interaction) -> bool:
        if str(interaction.user.id) in self.settings.blocked_users:
            return False
        if interaction.guild_id is None:
            return self.settings.discord_dms
        channel = interaction.channel or discord.Object(interaction.channel_id or 0)
        return self._allowed_here(interaction.guild_id, channel)


def _bot_is_member(interaction: discord.Interaction) -> bool:
    """Whether the bot is in the place of an interaction: its own DM, or a server it is
    in (cached). Elsewhere the app is there only through a user's install."""
    if interaction.context.dm_channel:
        return True
    # Not `interaction.guild`: discord.py makes up a stand-in for a server it is not in.
    return interaction.guild_id is not None and interaction.client.get_guild(interaction.guild_id) is not None


def _interaction_conversation(interaction: discord.Interaction) -> str:
    """The channel's conversation where the bot is a member; elsewhere one per user and
    channel, since only that user sees the answers."""
    if _bot_is_member(interaction):
        return f"discord:{interaction.channel_id}"
    return f"discord:{interaction.channel_id}:user:{interaction.user.id}"


def _unreadable(message: discord.Message, in_dm: bool, settings: Settings) -> bool:
    """Discord blanked the message's content: it replied to the bot without mentioning
    it, and the bot has no Message Content intent."""
    return not message.content and not in_dm and not settings.discord_message_content


def _guild_id(message: discord.Message) -> int | None:
    if message.guild is not None:
        return message.guild.id
    return getattr(message.channel, "guild_id", None)  # a channel of a guild not in the cache


def _addressed_to(message: discord.Message, my_id: int) -> bool:
    """A mention of the bot (not @everyone/@here or a role) or a reply to one of its messages."""
    if my_id in message.raw_mentions or any(user.id == my_id for user in message.mentions):
        return True
    reference = message.reference
    if reference is None or _is_forward(message):
        return False
    replied = reference.resolved or reference.cached_message
    return isinstance(replied, discord.Message) and replied.author.id == my_id


def _addressed_to_others(message: discord.Message, my_id: int) -> bool:
    """Said to someone else: it mentions another person (or a role, or everyone), or replies to
    a message that is not the bot's (or one Discord did not show: it may be anyone's)."""
    if message.mention_everyone or message.raw_role_mentions:
        return True
    if any(user_id != my_id for user_id in message.raw_mentions) or any(u.id != my_id for u in message.mentions):
        return True
    reference = message.reference
    if reference is None:
        return False
    replied = reference.resolved or reference.cached_message
    return not (isinstance(replied, discord.Message) and replied.author.id == my_id)


def _model_text(message: discord.Message, my_id: int) -> str:
    """The content with the bot's mentions removed and other mentions turned into names."""
    users = {user.id: user.display_name for user in message.mentions}
    roles = {role.id: role.name for role in message.role_mentions}
    channels = {channel.id: channel.name for channel in message.channel_mentions}

    def user_name(match: re.Match[str]) -> str:
        user_id = int(match.group(1))
        return "" if user_id == my_id else users.get(user_id, "someone")

    text = _USER_MENTION.sub(user_name, message.content)
    text = _ROLE_MENTION.sub(lambda m: roles.get(int(m.group(1)), "a role"), text)
    text = _CHANNEL_MENTION.sub(lambda m: "#" + channels.get(int(m.group(1)), "a channel"), text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _message_key(message_id: int) -> str:
    """A user's message as the inbox knows it (`Entry.key`); its exchange id derives from it."""
    return f"discord:{message_id}"


def _interaction_key(interaction_id: int) -> str:
    """What an "Ask BlenderBot" answer's exchange id derives from."""
    return f"discord-interaction:{interaction_id}"


def _key_answered(reply: discord.Message) -> str | None:
    """The key of what the bot's message answers if it says so itself: the interaction it is
    the response to, or the message its reference points to (the first chunk of an answer)."""
    if reply.interaction_metadata is not None:
        return _interaction_key(reply.interaction_metadata.id)
    reference = reply.reference
    if reference is not None and reference.message_id is not None and not _is_forward(reply):
        return _message_key(reference.message_id)
    return None


def _replies_to(message: discord.Message, message_id: int) -> bool:
    """Whether `message` is a reply to the message `message_id` (not a forward of it)."""
    reference = message.reference
    return reference is not None and reference.message_id == message_id and not _is_forward(message)


def _is_forward(message: discord.Message) -> bool:
    reference = message.reference
    return reference is not None and reference.type is discord.MessageReferenceType.forward


async def _show_typing(channel: discord.abc.Messageable) -> None:
    """"Typing..." in `channel` until cancelled. It is cosmetic: failing to show it
    (no permission, a network hiccup) must not cost the user the answer."""
    try:
        async with channel.typing():
            await asyncio.get_running_loop().create_future()  # until the answer is ready
    except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
        log.debug("Could not show the typing indicator: %s", error)


def _start_error(error: BaseException | None, settings: Settings) -> AdapterStartError:
    """One line telling the operator why the Discord client could not run."""
    if isinstance(error, discord.PrivilegedIntentsRequired):
        text = PRIVILEGED_INTENT_HELP
    elif isinstance(error, discord.LoginFailure):
        text = f"DISCORD_TOKEN was rejected by Discord: {error}"
    elif isinstance(error, discord.ConnectionClosed) and error.code == 4004:
        text = "DISCORD_TOKEN was rejected by Discord: the gateway closed with 4004 (authentication failed)"
    elif isinstance(error, discord.ConnectionClosed):
        text = f"the Discord gateway closed the connection with code {error.code} ({error.reason or 'no reason'})"
    elif isinstance(error, discord.HTTPException):
        text = f"Discord answered {error.status} during start-up: {error.text or error}"
    elif isinstance(error, (aiohttp.ClientError, OSError, discord.GatewayNotFound)):
        text = f"cannot reach Discord at {settings.discord_api_url} / {settings.discord_gateway_url}: {error}"
    elif error is None:
        text = "the Discord client stopped before it was ready"
    else:
        text = f"the Discord client failed to start: {type(error).__name__}: {error}"
    return AdapterStartError(" ".join(text.split()))


# -- endpoints -----------------------------------------------------------------
# discord.py reads its REST base and gateway URL from class constants
# (`Route.BASE`, `DiscordWebSocket.DEFAULT_GATEWAY`; internals, hence discord.py is
# pinned to 2.7.x) and has no per-client option for either. Assigning them would
# make every client in the process use the last adapter's endpoints. Instead the
# constants become context-aware: each adapter runs its client in a task whose
# context holds its own URLs, and anything outside such a context (another client,
# plain discord.py use) still sees Discord's defaults.

_api_base: contextvars.ContextVar[str] = contextvars.ContextVar("discord_api_base")
_gateway: contextvars.ContextVar[yarl.URL] = contextvars.ContextVar("discord_gateway")


class _PerContextDefault:
    """A class constant whose value is read from a context variable, falling back to
    the library's own value."""

    def __init__(self, variable: contextvars.ContextVar[Any], default: Any) -> None:
        self.variable = variable
        self.default = default

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self.variable.get(self.default)


def _route_endpoints_per_context() -> None:
    """Install the context-aware constants (once; later calls do nothing)."""
    targets = ((discord.http.Route, "BASE", _api_base), (discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", _gateway))
    for owner, name, variable in targets:
        current = owner.__dict__[name]
        if not isinstance(current, _PerContextDefault):
            setattr(owner, name, _PerContextDefault(variable, current))
