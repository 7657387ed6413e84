"""`/blenderbot persona|listen|show|reset` on Discord: a channel's settings (the verbs and
their words are bot/settings_commands.py's).

Registered with `default_member_permissions` = Manage Channels, so Discord shows the command
only to moderators, and checked again on every use against the member's permissions the
interaction carries (a server can hand the command to anyone). It works where the bot is:
a server that installed it, and the bot's own DM (there for that person's DM). A channel's
settings are kept under `discord:<channel>`; a thread's are its parent channel's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import discord
from discord import app_commands

from bot import settings_commands
from bot.config import Settings
from bot.engine import ReplyEngine

SETTINGS_COMMAND = "blenderbot"
NOT_A_MODERATOR = "Only people who can manage this channel (Manage Channels) can change my settings here."
LISTEN_NEEDS_INTENT = (
    "I can't listen in channels yet: Discord only shows me messages that mention me. The people running me must "
    "enable the Message Content intent at https://discord.com/developers/applications -> the app -> Bot -> "
    "Privileged Gateway Intents, and set DISCORD_MESSAGE_CONTENT=on."
)
LISTEN_IN_A_DM = "In a DM I answer every message already."

# The adapter's way to run a command's work as a tracked reply (refused where the bot is not welcome).
RunCommand = Callable[[discord.Interaction, Coroutine[Any, Any, None]], Awaitable[None]]


def settings_key(channel: Any) -> str:
    """Whose settings apply in `channel`: its own, or for a thread its parent channel's."""
    if isinstance(channel, discord.Thread) and channel.parent_id:
        return f"discord:{channel.parent_id}"
    return f"discord:{channel.id}"


def interaction_settings_key(interaction: discord.Interaction) -> str:
    return settings_key(interaction.channel or discord.Object(interaction.channel_id or 0))


class SettingsCommands:
    """The `/blenderbot` group. `run` is the adapter's tracked runner of a command's work;
    `is_member` tells whether the bot is in the place of an interaction."""

    def __init__(
        self, settings: Settings, engine: ReplyEngine, run: RunCommand,
        is_member: Callable[[discord.Interaction], bool],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.run = run
        self.is_member = is_member

    def group(self) -> app_commands.Group:
        group = app_commands.Group(
            name=SETTINGS_COMMAND,
            description="My settings in this channel (for people who manage it)",
            default_permissions=discord.Permissions(manage_channels=True),
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=False),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
        )
        engine = self.engine

        @app_commands.describe(text="Facts about me, separated by |, e.g. I love hiking | I have a dog")
        async def persona(interaction: discord.Interaction, text: str) -> None:
            await self._answer(interaction, lambda channel: settings_commands.set_persona(engine, channel, text))

        @app_commands.describe(mode="on: I answer every message here; off: only those that mention or reply to me")
        async def listen(interaction: discord.Interaction, mode: Literal["on", "off"]) -> None:
            await self._answer(interaction, lambda channel: self._set_listening(interaction, channel, mode))

        async def show(interaction: discord.Interaction) -> None:
            await self._answer(interaction, lambda channel: settings_commands.show(engine, channel))

        async def reset(interaction: discord.Interaction) -> None:
            await self._answer(interaction, lambda channel: settings_commands.reset(engine, channel))

        for name, description, callback in (
            ("persona", "Give me a character in this channel: facts about me, separated by |", persona),
            ("listen", "Answer every message in this channel (on), or only those for me (off)", listen),
            ("show", "Show my settings in this channel", show),
            ("reset", "Put my settings in this channel back to the defaults", reset),
        ):
            group.add_command(app_commands.Command(name=name, description=description, callback=callback))
        return group

    async def _answer(self, interaction: discord.Interaction, work: Callable[[str], Awaitable[str]]) -> None:
        """Run `work(channel)` (a verb; the text of its answer) for someone allowed to, answered
        only to them; anyone else gets a one-line refusal."""

        async def answer() -> None:
            if not self._may_change_settings(interaction):
                await interaction.response.send_message(NOT_A_MODERATOR, ephemeral=True)
                return
            await interaction.response.defer(thinking=True, ephemeral=True)  # the safety filter, the store
            await interaction.followup.send(await work(interaction_settings_key(interaction)), ephemeral=True)

        await self.run(interaction, answer())

    def _may_change_settings(self, interaction: discord.Interaction) -> bool:
        """A member with Manage Channels in a server the bot is in, or the person in their own DM with the bot."""
        if interaction.guild_id is None:
            return bool(interaction.context.dm_channel)
        return self.is_member(interaction) and interaction.permissions.manage_channels

    async def _set_listening(self, interaction: discord.Interaction, channel: str, mode: str) -> str:
        if interaction.guild_id is None:
            return LISTEN_IN_A_DM
        if mode == "on" and not self.settings.discord_message_content:
            return LISTEN_NEEDS_INTENT
        return await settings_commands.set_listening(self.engine, channel, mode == "on")
