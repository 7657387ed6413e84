"""`/blenderbot` in Slack: a channel's settings (its persona, whether the bot listens
there; the verbs are bot/settings_commands.py's), for workspace admins and owners
(users.info's `is_admin` / `is_owner`) and the people in SLACK_ADMIN_USERS; in a DM
with the bot, for that person. Everyone else gets a one-line refusal.

The command is acked at once (Slack wants an answer within 3 s) and answered through
its `response_url`, which only the person who used it sees. A channel's settings are
kept under `slack:<team>:<channel>`, for all its threads (a DM's under the DM's
conversation key, so "Forget my conversations" deletes them with the DM).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_surface import NETWORK_ERRORS
from adapters.slack_text import to_model_text, to_slack_text
from bot import settings_commands
from bot.config import Settings
from bot.engine import ReplyEngine

log = logging.getLogger(__name__)

COMMAND = settings_commands.COMMAND
NOT_AN_ADMIN = (
    "Only workspace admins and owners (and the people the bot's operators named in SLACK_ADMIN_USERS) "
    "can change my settings in a channel."
)
NOT_HERE = "I'm not enabled here."
LISTEN_IN_A_DM = "In our DM I answer every message already."
LISTEN_NOTE = (
    "(Slack sends me a channel's messages only if the app subscribes to the message.channels and message.groups "
    "events, with the channels:history and groups:history scopes: see slack-manifest.yml.)"
)
ROLE_TTL = 300.0  # seconds a users.info answer about someone's role is trusted
MAX_ROLES = 5_000


class SlackSettingsCommand:
    """The `/blenderbot` listener. `spawn` runs work as a tracked task (drained on shutdown)."""

    def __init__(
        self,
        settings: Settings,
        engine: ReplyEngine,
        client: AsyncWebClient,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.spawn = spawn
        self._admins: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # user -> (admin?, expiry)

    def register(self, app: AsyncApp) -> None:
        app.command(COMMAND)(self._on_command)

    async def _on_command(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()  # within Slack's 3 s; the answer follows through the response_url
        self.spawn(self._answer_command(command, respond))

    async def _answer_command(self, command: dict[str, Any], respond: Any) -> None:
        try:
            text = await self._run(command)
        except Exception:
            log.exception("The %s command failed", COMMAND)
            text = settings_commands.NOT_SAVED
        try:
            await respond(text=to_slack_text(text), response_type="ephemeral")  # shown as written, pinging nobody
        except NETWORK_ERRORS as error:  # the person sees no answer; nothing else to do
            log.warning("Could not answer a %s command: %s", COMMAND, error)

    async def _run(self, command: dict[str, Any]) -> str:
        """The answer to one use of the command: what it changed or showed, or why not."""
        user, team, channel = command.get("user_id"), command.get("team_id"), command.get("channel_id")
        if not (user and team and channel) or user in self.settings.blocked_users:
            return NOT_HERE
        if self.settings.slack_team_ids and team not in self.settings.slack_team_ids:
            return NOT_HERE
        in_dm = channel.startswith("D") or command.get("channel_name") == "directmessage"
        if not in_dm:
            if self.settings.slack_channel_ids and channel not in self.settings.slack_channel_ids:
                return NOT_HERE
            if not await self._may_change_settings(user):
                return NOT_AN_ADMIN
        # As the model reads Slack text: `&amp;` back to `&`, tokens (<@U…>, <!here>) as plain words.
        text = to_model_text(command.get("text") or "", bot_user_id=None, names={})
        if in_dm and text.strip().lower().startswith("listen"):
            return LISTEN_IN_A_DM
        return await settings_commands.run(self.engine, f"slack:{team}:{channel}", text, listen_note=LISTEN_NOTE)

    async def _may_change_settings(self, user: str) -> bool:
        """SLACK_ADMIN_USERS, or a workspace admin or owner as users.info says (cached a while)."""
        if user in self.settings.slack_admin_users:
            return True
        now = asyncio.get_running_loop().time()
        cached = self._admins.get(user)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            response = await self.client.users_info(user=user)
        except (SlackApiError, *NETWORK_ERRORS) as error:
            log.warning("users.info failed for %s (%s): not letting them change settings", user, error)
            return False
        info = response.get("user") or {}
        admin = bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))
        self._admins[user] = (admin, now + ROLE_TTL)
        self._admins.move_to_end(user)
        while len(self._admins) > MAX_ROLES:
            self._admins.popitem(last=False)
        return admin
