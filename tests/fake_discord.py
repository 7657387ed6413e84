"""A local fake of the Discord gateway and REST API for driving the real
discord.py client (see ../shared/docs/platforms.md).

One aiohttp server on 127.0.0.1 (port 0): REST under `/api/v10`, the gateway
websocket at `/gateway`. It knows one guild with two text channels and a
thread, a DM channel, a few users; it records every REST call, echoes the
bot's own messages back on the gateway as Discord does, answers a message sent
again with the same nonce (`enforce_nonce`) with the one created first, and can
answer 429, hold a request for a while before handling it, handle a request but
withhold its answer (`hold_response`), drop the connection of a request before or
after handling it (`drop_connection`), refuse one for a missing permission (403),
reject the token (401), refuse intents
(4014) or drop the gateway (4000; 4004 ends a session for good). It also
dispatches reactions and interactions (slash commands, the message context
menu) from a server install or from a user's install in places the bot is no
member of, and answers their callbacks and followups.
The bot's edits of its messages (PATCH) are kept, and sent on as MESSAGE_UPDATE.

Everything that crosses it is checked against Discord's published contracts (tests/discord_contract.py):
a request that Discord's OpenAPI document refuses is answered 400 "Invalid Form Body" as Discord
would, and every violation, the fake's own answers and gateway payloads included, fails the test.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web
from discord_contract import ViolationLog, check_gateway, check_request, check_response, operation_id

BOT_ID = 810000000000000001
APP_ID = BOT_ID
GUILD_ID = 820000000000000001
CHANNEL_ID = 830000000000000001  # #general
OTHER_CHANNEL_ID = 830000000000000002  # #random
THREAD_ID = 830000000000000003  # a thread in #general
DM_CHANNEL_ID = 830000000000000009
GROUP_DM_ID = 830000000000000010  # a group DM the bot is not in (reached through a user install)
FOREIGN_GUILD_ID = 820000000000000002  # a server the bot is not in (a user install used there)
FOREIGN_CHANNEL_ID = 830000000000000020
USER_ID = 840000000000000001
OTHER_USER_ID = 840000000000000002
OTHER_BOT_ID = 840000000000000003
ROLE_ID = 850000000000000001
WEBHOOK_ID = 860000000000000001

MESSAGE_CONTENT_INTENT = 1 << 15
EPHEMERAL = 1 << 6
SEND_MESSAGES = 1 << 11
MANAGE_CHANNELS = 1 << 4
MEMBER_PERMISSIONS = SEND_MESSAGES  # what an ordinary member may do in a channel
NONCE_WINDOW = 300.0  # seconds Discord remembers a nonce ("the past few minutes")


@dataclass
class Call:
    """One REST request as the fake saw it."""

    method: str
    path: str  # without the /api/v10 prefix
    json: Any
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)
    response: Any = None  # what the fake answered
    deduplicated: bool = False  # a repeated nonce: answered with the message created before, none created
    at: float = field(default_factory=time.time)  # when the fake received it


def _user(user_id: int, name: str, *, bot: bool = False, global_name: str | None = None) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": global_name,
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
        "flags": 0,
        "primary_guild": None,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()


USERS = {
    BOT_ID: _user(BOT_ID, "blender-chat", bot=True),
    USER_ID: _user(USER_ID, "alice", global_name="Alice Liddell"),
    OTHER_USER_ID: _user(OTHER_USER_ID, "bob", global_name="Bob"),
    OTHER_BOT_ID: _user(OTHER_BOT_ID, "otherbot", bot=True),
}
NICKNAMES = {OTHER_USER_ID: "Bobby Tables"}  # a guild nickname wins over the global name


class FakeDiscord:
    def __init__(self, token: str = "fake-discord-token") -> None:
        self.token = token
        self.calls: list[Call] = []
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.reject_identify_with: int | None = None  # a close code, e.g. 4014 or 4004
        self.commands: list[dict[str, Any]] = []  # registered slash commands
        self.messages: dict[int, dict[str, Any]] = {}  # every message by id
        self._interaction_channels: dict[str, int] = {}  # interaction token -> its channel
        self._interaction_metadata: dict[str, dict[str, Any]] = {}  # token -> what its response messages carry
        self._ids = itertools.count(870000000000000001)
        self._seq = itertools.count(1)
        self._sockets: list[_Socket] = []
        self._sessions: set[str] = set()
        self._rate_limits: list[tuple[str, str, float]] = []
        self._delays: list[tuple[str, str, float]] = []
        self.held = 0  # requests being held by `delay` right now
        self._holds: list[tuple[str, str]] = []  # (method, path) whose next answer is withheld
        self._drops: list[tuple[str, str, bool]] = []  # (method, path, handled first) whose connection is dropped
        self._forbidden: list[tuple[str, str]] = []  # (method, path) answered 403 Missing Access next
        self.withheld: list[Call] = []  # handled requests whose answer `hold_response` keeps back right now
        self._release = asyncio.Event()  # set (and replaced) by release_held()
        self._nonces: dict[str, tuple[int, float]] = {}  # the bot's nonce -> (its message id, when created)
        self.nonce_window = NONCE_WINDOW
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.contract = ViolationLog()  # where it differed from Discord's contracts; take() to expect some
        # The gateway URL READY names for resuming (`resume_gateway_url`): a proxy in front of the fake
        # sets its own, so that a resumed connection goes through it too.
        self.resume_gateway_url: str | None = None
        # Seconds every message the bot creates takes before Discord does it: (shortest, longest).
        self.post_latency: tuple[float, float] | None = None
        self.latency_rng = random.Random()

    # -- server ------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.contract.open()

    async def stop(self) -> None:
        self._stopping.set()  # lets held requests go
        self.release_held()
        for socket in list(self._sockets):
            await socket.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.contract.close()  # raises for a violation no test has reported yet

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- what tests drive ---------------------------------------------------

    async def send_message(
        self,
        content: str,
        *,
        channel_id: int = CHANNEL_ID,
        author_id: int = USER_ID,
        mentions: tuple[int, ...] = (),
        mention_everyone: bool = False,
        mention_roles: tuple[int, ...] = (),
        webhook: bool = False,
        reply_to: int | None = None,
        forward_of: int | None = None,
        message_type: int | None = None,
    ) -> int:
        """Dispatch a MESSAGE_CREATE as if a user wrote `content` (or forwarded the
        message `forward_of`: empty content, a reference of type 1 and a snapshot); returns its id."""
        in_guild = channel_id != DM_CHANNEL_ID
        data: dict[str, Any] = {
            "id": str(next(self._ids)),
            "channel_id": str(channel_id),
            "author": USERS[author_id] if not webhook else _user(WEBHOOK_ID, "Captain Hook", bot=True),
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": mention_everyone,
            "mentions": [self._mentioned(user_id, in_guild) for user_id in mentions],
            "mention_roles": [str(role) for role in mention_roles],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if in_guild:
            data["guild_id"] = str(GUILD_ID)
            if not webhook:
                data["member"] = self._member(author_id)
        if webhook:
            data["webhook_id"] = str(WEBHOOK_ID)
        if reply_to is not None:
            replied = self.messages[reply_to]
            data["type"] = 19
            data["message_reference"] = {"message_id": str(reply_to), "channel_id": replied["channel_id"], "type": 0}
            data["referenced_message"] = _rest_message(replied)  # a message object, not a MESSAGE_CREATE
        if forward_of is not None:
            forwarded = self.messages[forward_of]
            data["message_reference"] = {
                "type": 1, "message_id": str(forward_of), "channel_id": forwarded["channel_id"],
                **({"guild_id": forwarded["guild_id"]} if "guild_id" in forwarded else {}),
            }
            snapshot = {key: forwarded[key] for key in ("type", "content", "embeds", "attachments", "timestamp",
                                                        "edited_timestamp", "flags", "mentions", "mention_roles")}
            data["message_snapshots"] = [{"message": snapshot}]
        if message_type is not None:
            data["type"] = message_type
        self.messages[int(data["id"])] = data
        await self.dispatch("MESSAGE_CREATE", data)
        return int(data["id"])

    async def slash_command(self, name: str, *, channel_id: int = CHANNEL_ID, user_id: int = USER_ID,
                            subcommand: str | None = None, options: dict[str, Any] | None = None,
                            permissions: int = MEMBER_PERMISSIONS) -> int:
        """Dispatch an INTERACTION_CREATE for a registered slash command; returns the interaction id.
        `channel_id` GROUP_DM_ID or FOREIGN_CHANNEL_ID: used through the user's install of the app.
        `subcommand` and its `options` (name -> value) are sent as Discord sends a subcommand's
        (`data.options`: the subcommand, its options inside), each typed as the command was
        registered; `permissions` are the member's in that channel (the interaction's
        `member.permissions`)."""
        command = next(c for c in self.commands if c["name"] == name)
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1}
        if subcommand is not None:
            registered = next(o for o in command["options"] if o["name"] == subcommand)
            known = {o["name"]: o for o in registered.get("options") or []}
            unknown = set(options or {}) - set(known)
            assert not unknown, f"/{name} {subcommand} has no options {unknown}"
            given = [{"name": key, "type": known[key]["type"], "value": value}
                     for key, value in (options or {}).items()]
            data["options"] = [{"name": subcommand, "type": registered["type"], "options": given}]
        return await self._interaction(data, channel_id, user_id, permissions=permissions)

    async def context_menu(self, name: str, message_id: int, *, channel_id: int | None = None,
                           user_id: int = USER_ID) -> int:
        """Dispatch a message context-menu command on `message_id` (in its channel unless told)."""
        command = next(c for c in self.commands if c["name"] == name)
        message = self.messages[message_id]
        data = {"id": command["id"], "name": name, "type": 3, "target_id": str(message_id),
                "resolved": {"messages": {str(message_id): _rest_message(message)}}}
        return await self._interaction(data, channel_id or int(message["channel_id"]), user_id)

    async def _interaction(self, command: dict[str, Any], channel_id: int, user_id: int,
                           permissions: int = MEMBER_PERMISSIONS) -> int:
        interaction_id = next(self._ids)
        token = f"interaction-token-{interaction_id}"
        self._interaction_channels[token] = channel_id
        data: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(APP_ID),
            "type": 2,
            "data": command,
            "token": token,
            "version": 1,
            "channel_id": str(channel_id),
            "locale": "en-US",
            "app_permissions": "2048",
            "attachment_size_limit": 8 * 1024 * 1024,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(GUILD_ID)},
        }
        if channel_id == DM_CHANNEL_ID:
            data["channel"] = {"id": str(channel_id), "type": 1}
            data["user"] = USERS[user_id]
            data["context"] = 1
        elif channel_id == GROUP_DM_ID:
            # A user install: only the user's own integration authorizes it, the bot is not in there.
            data["channel"] = {"id": str(channel_id), "type": 3, "name": "friends", "recipients": []}
            data["user"] = USERS[user_id]
            data["context"] = 2
            data["authorizing_integration_owners"] = {"1": str(user_id)}
        elif channel_id == FOREIGN_CHANNEL_ID:
            data["channel"] = {"id": str(channel_id), "type": 0, "name": "elsewhere",
                               "guild_id": str(FOREIGN_GUILD_ID), "position": 0, "permission_overwrites": []}
            data["guild_id"] = str(FOREIGN_GUILD_ID)
            data["member"] = {**self._member(user_id), "user": USERS[user_id], "permissions": str(permissions)}
            data["context"] = 0
            data["authorizing_integration_owners"] = {"1": str(user_id)}
        else:
            data["channel"] = {"id": str(channel_id), "type": 11 if channel_id == THREAD_ID else 0}
            data["guild_id"] = str(GUILD_ID)
            data["member"] = {**self._member(user_id), "user": USERS[user_id], "permissions": str(permissions)}
            data["context"] = 0
        # The messages answering it carry this (Discord's ApplicationCommandInteractionMetadataResponse).
        metadata = {"id": data["id"], "type": 2, "user": USERS[user_id],
                    "authorizing_integration_owners": data["authorizing_integration_owners"]}
        if "target_id" in command:
            metadata["target_message_id"] = command["target_id"]
        self._interaction_metadata[token] = metadata
        await self.dispatch("INTERACTION_CREATE", data)
        return interaction_id

    async def react(self, message_id: int, emoji: str, *, user_id: int = USER_ID) -> None:
        """Dispatch a MESSAGE_REACTION_ADD: `user_id` added `emoji` to `message_id`."""
        message = self.messages[message_id]
        data: dict[str, Any] = {
            "user_id": str(user_id), "channel_id": message["channel_id"], "message_id": str(message_id),
            "emoji": {"id": None, "name": emoji}, "message_author_id": message["author"]["id"],
            "burst": False, "burst_colors": [], "type": 0,
        }
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
            data["member"] = {**self._member(user_id), "user": USERS[user_id]}
        await self.dispatch("MESSAGE_REACTION_ADD", data)

    @property
    def live_sessions(self) -> int:
        """Gateway connections that are identified or resumed now: what dispatches reach."""
        return sum(1 for socket in self._sockets if socket.live and not socket.ws.closed)

    def interaction_calls(self, interaction_id: int) -> list[Call]:
        """The callback and every followup of one interaction, in order."""
        return [c for c in self.calls
                if c.path.startswith(f"/interactions/{interaction_id}/") or f"interaction-token-{interaction_id}" in c.path]

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for socket in list(self._sockets):
            if socket.live:
                await socket.send_dispatch(event, data, next(self._seq))

    async def close_gateway(self, code: int = 4000) -> None:
        """Drop every gateway connection with `code` (4000: unknown error, the client resumes)."""
        for socket in list(self._sockets):
            socket.live = False
            await socket.ws.close(code=code, message=b"fake close")

    def rate_limit(self, method: str, path: str, *, retry_after: float = 0.25) -> None:
        """Answer the next `method path` request with a 429 as Discord does."""
        self._rate_limits.append((method, path, retry_after))

    def delay(self, method: str, path: str, seconds: float) -> None:
        """Hold the next `method path` request for `seconds` (or until the fake stops) before handling it."""
        self._delays.append((method, path, seconds))

    def hold_response(self, method: str, path: str) -> None:
        """Handle the next `method path` request as usual (a message is created, recorded and
        dispatched) but leave its connection open, unanswered, until `release_held()` or `stop()`:
        the platform did it, the client never learned that it did."""
        self._holds.append((method, path))

    def drop_connection(self, method: str, path: str, *, handled: bool) -> None:
        """Close the connection of the next `method path` request without answering, after
        handling it (`handled`: a message is created, the client never hears so) or before."""
        self._drops.append((method, path, handled))

    def forbid(self, method: str, path: str) -> None:
        """Answer the next `method path` request 403 Missing Access (code 50001), as Discord
        does when the bot lacks a permission there (say Read Message History)."""
        self._forbidden.append((method, path))

    def release_held(self) -> None:
        """Send every answer `hold_response` is keeping back now."""
        self._release.set()
        self._release = asyncio.Event()  # later holds wait for the next release

    async def wait_for(self, predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}; REST calls: {self.summary()}")
            await asyncio.sleep(0.01)

    # -- what tests read ----------------------------------------------------

    def created(self, channel_id: int | None = None) -> list[Call]:
        """Messages the bot created (successful POSTs, not those a repeated nonce answered), in order."""
        return [
            call
            for call in self.calls
            if call.method == "POST"
            and call.status == 200
            and not call.deduplicated
            and call.path.startswith("/channels/")
            and call.path.endswith("/messages")
            and (channel_id is None or call.path == f"/channels/{channel_id}/messages")
        ]

    def edits(self, message_id: int | None = None) -> list[Call]:
        """The bot's successful edits of messages (of one message, if given), in order."""
        return [call for call in self.calls if call.method == "PATCH" and call.status == 200
                and call.path.startswith("/channels/") and "/messages/" in call.path
                and (message_id is None or call.path.endswith(f"/messages/{message_id}"))]

    def touching(self, channel_id: int) -> list[Call]:
        """Every call about a channel: typing and messages."""
        return [call for call in self.calls if call.path.startswith(f"/channels/{channel_id}/")]

    def summary(self) -> list[str]:
        return [f"{call.method} {call.path} {call.status}" for call in self.calls]

    def reply_ids(self, channel_id: int | None = None) -> list[int]:
        """Ids of the messages the bot created (in the order it created them)."""
        return [int(call.response["id"]) for call in self.created(channel_id)]

    # -- REST ---------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body = await request.json() if request.can_read_body and request.content_type == "application/json" else None
        call = Call(request.method, path, body, query=dict(request.query))
        self.calls.append(call)
        headers = {name: request.headers[name] for name in ("Authorization",) if name in request.headers}
        refused = check_request(request.method, path, query=call.query, headers=headers, body=body)
        if refused:
            self.contract.add(refused)
            if operation_id(request.method, path) is None:
                call.status, call.response = 404, {"message": "404: Not Found", "code": 0}
            else:
                call.status, call.response = 400, _invalid_form_body(refused)
            response = _json(call.response, status=call.status)
        else:
            response = await self._answer(request, path, body, call)
        if request.transport is None or request.transport.is_closing():
            return response  # the connection was dropped (by a test, or the client left): nothing goes back
        # Exactly what goes back, 401s and 429s included, is checked: once it has gone, so that the check
        # (a few milliseconds) does not delay the answer and widen the races the tests look at.
        sent = json.loads(response.body) if response.body else None  # type: ignore[arg-type]
        check = functools.partial(check_response, request.method, path, query=call.query, headers=headers,
                                  body=body, status=response.status, answer=sent)
        asyncio.get_running_loop().call_soon(lambda: self.contract.add(check()))
        return response

    async def _answer(self, request: web.Request, path: str, body: Any, call: Call) -> web.Response:
        webhook_style = path.startswith(("/interactions/", "/webhooks/"))  # these carry no bot token
        if not webhook_style and request.headers.get("Authorization") != f"Bot {self.token}":
            call.status, call.response = 401, {"message": "401: Unauthorized", "code": 0}
            return _json(call.response, status=401)
        if self.post_latency is not None and request.method == "POST" and path.endswith("/messages"):
            await asyncio.sleep(self.latency_rng.uniform(*self.post_latency))
        for delay in self._delays:
            if delay[0] == request.method and delay[1] == path:
                self._delays.remove(delay)
                self.held += 1
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay[2])
                except TimeoutError:
                    pass
                finally:
                    self.held -= 1
                break
        for limit in self._rate_limits:
            if limit[0] == request.method and limit[1] == path:
                self._rate_limits.remove(limit)
                call.status = 429
                return _rate_limited(limit[2])
        if (request.method, path) in self._forbidden:
            self._forbidden.remove((request.method, path))
            call.status = 403
            return _json({"message": "Missing Access", "code": 50001}, status=403)
        drop = next((d for d in self._drops if d[:2] == (request.method, path)), None)
        if drop is not None:
            self._drops.remove(drop)
            if not drop[2]:
                call.status = 0  # never handled
                request.transport.close()  # type: ignore[union-attr]
                return web.Response(status=204)  # never reaches the client
        status, payload = self._route(request.method, path, body, call)
        call.status, call.response = status, payload
        if drop is not None:
            request.transport.close()  # type: ignore[union-attr]
            return web.Response(status=204)  # never reaches the client
        if (request.method, path) in self._holds:
            self._holds.remove((request.method, path))
            await self._withhold(call)
        if status == 204:
            return web.Response(status=204)
        return _json(payload, status=status)

    def _route(self, method: str, path: str, body: Any, call: Call) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/users/@me"):
            return 200, {**USERS[BOT_ID], "verified": True, "mfa_enabled": False, "locale": "en-US"}
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return 200, self._application()
        if (method, path) in (("GET", "/gateway/bot"), ("GET", "/gateway")):
            limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
            return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            self.commands = [self._command(command) for command in body]
            return 200, self.commands
        if method == "POST" and parts[0] == "channels" and parts[-1] == "typing":
            return 204, None
        if method == "GET" and parts[0] == "channels" and parts[2] == "messages" and len(parts) == 4:
            message = self.messages.get(int(parts[3]))
            if message is None or message["channel_id"] != parts[1]:
                return 404, {"message": "Unknown Message", "code": 10008}
            return 200, _rest_message(message)
        if method == "GET" and parts[0] == "channels" and parts[-1] == "messages":
            return 200, self._list_messages(parts[1], call.query)
        if method == "POST" and parts[0] == "channels" and parts[-1] == "messages":
            return self._create_message(int(parts[1]), body, call)
        if method == "PATCH" and parts[0] == "channels" and parts[2] == "messages" and len(parts) == 4:
            return self._edit_message(int(parts[1]), int(parts[3]), body)
        if method == "POST" and parts[0] == "interactions" and parts[-1] == "callback":
            kind = body["type"]
            interaction = {
                "id": parts[1],
                "type": 2,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool((body.get("data") or {}).get("flags", 0) & EPHEMERAL),
            }
            if kind != 4:  # only a message sent with the callback is a resource (a deferral creates none yet)
                return 200, {"interaction": interaction}
            channel_id = self._interaction_channels.get(parts[2], CHANNEL_ID)
            message = {**self._bot_message(channel_id, body["data"], store=False),
                       "webhook_id": str(APP_ID), "flags": body["data"].get("flags", 0)}
            interaction["response_message_id"] = message["id"]
            return 200, {"interaction": interaction, "resource": {"type": 4, "message": _rest_message(message)}}
        if method == "POST" and parts[0] == "webhooks":
            channel_id = self._interaction_channels.get(parts[2], CHANNEL_ID)
            message = self._bot_message(channel_id, body)
            message["webhook_id"] = str(APP_ID)
            if parts[2] in self._interaction_metadata:
                message["interaction_metadata"] = self._interaction_metadata[parts[2]]
            message["flags"] = body.get("flags", 0)
            return 200, _rest_message(message)
        if method == "DELETE" and parts[0] == "webhooks":  # (an edit would answer 200 and the message)
            return 204, None
        return 404, {"message": "404: Not Found", "code": 0}

    def _create_message(self, channel_id: int, body: dict[str, Any], call: Call) -> tuple[int, Any]:
        """POST /channels/{id}/messages. With `enforce_nonce`, a nonce the bot used in the last
        few minutes (in any channel) answers the message it created then, and nothing is created."""
        nonce = body.get("nonce")  # one longer than Discord takes (25) was refused by the contract check already
        earlier = self._nonces.get(str(nonce)) if nonce is not None and body.get("enforce_nonce") else None
        if earlier is not None and time.monotonic() - earlier[1] < self.nonce_window:
            call.deduplicated = True
            return 200, {**_rest_message(self.messages[earlier[0]]), "nonce": nonce}
        message = self._bot_message(channel_id, body)
        if nonce is not None:
            # Only the create answer and the gateway echo carry the nonce, not a message fetched later.
            self._nonces[str(nonce)] = (int(message["id"]), time.monotonic())
            message = {**message, "nonce": nonce}
        # Discord echoes the bot's own messages back on the gateway (with the gateway's extra fields).
        asyncio.get_running_loop().create_task(self.dispatch("MESSAGE_CREATE", message))
        return 200, _rest_message(message)

    def _list_messages(self, channel_id: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """GET /channels/{id}/messages: at most `limit` (1-100, default 50) of the channel's
        messages before `before`, or right after `after`, or the latest; newest first as
        Discord returns them (and as discord.py's history() pages them)."""
        limit = max(1, min(100, int(query.get("limit", 50))))
        ids = sorted(id for id, message in self.messages.items() if message["channel_id"] == channel_id)
        if "after" in query:
            ids = [id for id in ids if id > int(query["after"])][:limit]
        else:
            if "before" in query:
                ids = [id for id in ids if id < int(query["before"])]
            ids = ids[-limit:]
        return [_rest_message(self.messages[id]) for id in reversed(ids)]

    def _edit_message(self, channel_id: int, message_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        """PATCH /channels/{id}/messages/{id} (Discord's "Edit Message"): only the author edits the
        content; the message comes back edited, and MESSAGE_UPDATE goes out on the gateway."""
        message = self.messages.get(message_id)
        if message is None or message["channel_id"] != str(channel_id):
            return 404, {"message": "Unknown Message", "code": 10008}
        if message["author"]["id"] != str(BOT_ID):
            return 403, {"message": "Cannot edit a message authored by another user", "code": 50005}
        edited = {**message, "edited_timestamp": _now()}
        if "content" in body:
            edited["content"] = body["content"] or ""
        self.messages[message_id] = edited
        asyncio.get_running_loop().create_task(self.dispatch("MESSAGE_UPDATE", edited))
        return 200, _rest_message(edited)

    async def _withhold(self, call: Call) -> None:
        """Keep the answer to `call` back until release_held() or stop()."""
        if self._stopping.is_set():
            return
        release = self._release
        self.withheld.append(call)
        try:
            await release.wait()
        finally:
            self.withheld = [c for c in self.withheld if c is not call]

    def _bot_message(self, channel_id: int, body: dict[str, Any], *, store: bool = True) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": str(next(self._ids)),
            "channel_id": str(channel_id),
            "author": USERS[BOT_ID],
            "content": body.get("content") or "",
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": 19 if body.get("message_reference") else 0,
            "flags": 0,
        }
        if channel_id == FOREIGN_CHANNEL_ID:
            message["guild_id"] = str(FOREIGN_GUILD_ID)
        elif channel_id not in (DM_CHANNEL_ID, GROUP_DM_ID):
            message["guild_id"] = str(GUILD_ID)
            message["member"] = self._member(BOT_ID)
        if body.get("message_reference"):
            # What Discord answers: the reference resolved (type 0, snowflakes as strings), not the request's echo.
            asked = body["message_reference"]
            referenced = self.messages.get(int(asked["message_id"]), {})
            message["message_reference"] = {
                "type": 0, "message_id": str(asked["message_id"]),
                "channel_id": referenced.get("channel_id", str(channel_id)),
                **({"guild_id": referenced["guild_id"]} if "guild_id" in referenced else {}),
            }
        if store:
            self.messages[int(message["id"])] = message
        return message

    def _application(self) -> dict[str, Any]:
        # Discord's PrivateApplicationResponse: its required fields, and the optional ones discord.py reads.
        return {
            "id": str(APP_ID),
            "name": "blender-chat",
            "icon": None,
            "description": "",
            "type": None,
            "bot": USERS[BOT_ID],
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": 0,
            "flags_new": "0",
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "owner": USERS[USER_ID],
            "approximate_guild_count": 1,
            "approximate_user_install_count": 0,
            "approximate_user_authorization_count": 0,
            "explicit_content_filter": 0,
            "team": None,
            "eligible_oauth2_scopes": ["bot", "applications.commands"],
        }

    def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": 1,
            "description": "",  # context menus have none
            "options": [],
            "default_member_permissions": None,
            "dm_permission": True,
            "nsfw": False,
            "name_localizations": None,
            "description_localizations": None,
            **command,
            # A bit set the request gives as an integer, and Discord answers as a string.
            "default_member_permissions": _string_or_none(command.get("default_member_permissions")),
            "id": str(next(self._ids)),
            "application_id": str(APP_ID),
            "version": str(next(self._ids)),
        }

    def _member(self, user_id: int) -> dict[str, Any]:
        nick = NICKNAMES.get(user_id)
        return {"roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0, "nick": nick}

    def _mentioned(self, user_id: int, in_guild: bool) -> dict[str, Any]:
        if user_id == BOT_ID or not in_guild:
            return dict(USERS[user_id])
        return {**USERS[user_id], "member": self._member(user_id)}

    # -- gateway ------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        socket = _Socket(ws, self._check_sent)
        self._sockets.append(socket)
        try:
            await socket.send({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                self.contract.add(check_gateway(payload, from_client=True))
                await self._on_gateway_payload(socket, payload)
        finally:
            self._sockets.remove(socket)
        return ws

    async def _on_gateway_payload(self, socket: _Socket, payload: dict[str, Any]) -> None:
        op, data = payload["op"], payload.get("d")
        if op == 1:
            await socket.send({"op": 11, "s": None, "t": None})
        elif op == 2:
            self.identifies.append(data)
            if self.reject_identify_with is not None:
                await socket.ws.close(code=self.reject_identify_with, message=b"rejected by the fake")
                return
            session_id = uuid.uuid4().hex
            self._sessions.add(session_id)
            ready = {
                "v": 10,
                "user": USERS[BOT_ID],
                "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                "session_id": session_id,
                "resume_gateway_url": self.resume_gateway_url or self.gateway_url,
                "application": {"id": str(APP_ID), "flags": 0, "flags_new": "0"},
                "shard": data.get("shard", [0, 1]),
            }
            await socket.send_dispatch("READY", ready, next(self._seq))
            await socket.send_dispatch("GUILD_CREATE", self._guild(), next(self._seq))
            socket.live = True
        elif op == 6:
            self.resumes.append(data)
            if data.get("session_id") in self._sessions:
                await socket.send_dispatch("RESUMED", {}, next(self._seq))
                socket.live = True
            else:
                await socket.send({"op": 9, "d": False, "s": None, "t": None})

    def _guild(self) -> dict[str, Any]:
        def channel(channel_id: int, name: str, position: int) -> dict[str, Any]:
            return {
                "id": str(channel_id),
                "type": 0,
                "name": name,
                "position": position,
                "guild_id": str(GUILD_ID),
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "rate_limit_per_user": 0,
                "topic": None,
            }

        def role(role_id: int, name: str, position: int) -> dict[str, Any]:
            return {
                "id": str(role_id),
                "name": name,
                "permissions": "3072",
                "position": position,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": True,
                "flags": 0,
                "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            }

        thread = {
            "id": str(THREAD_ID),
            "type": 11,
            "name": "a thread",
            "guild_id": str(GUILD_ID),
            "parent_id": str(CHANNEL_ID),
            "owner_id": str(USER_ID),
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now(),
                "locked": False,
            },
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
        }
        return {
            "id": str(GUILD_ID),
            "name": "Fake Guild",
            "unavailable": False,
            "owner_id": str(USER_ID),
            "member_count": 4,
            "large": False,
            "joined_at": _now(),
            "roles": [role(GUILD_ID, "@everyone", 0), role(ROLE_ID, "helpers", 1)],
            "channels": [channel(CHANNEL_ID, "general", 0), channel(OTHER_CHANNEL_ID, "random", 1)],
            "threads": [thread],
            "members": [{**self._member(BOT_ID), "user": USERS[BOT_ID]}],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "preferred_locale": "en-US",
            "premium_tier": 0,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "system_channel_flags": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "hub_type": None,
            "incidents_data": None,
            "application_id": None,
            # Discord sends these with null rather than leaving them out.
            **dict.fromkeys(("icon", "splash", "discovery_splash", "banner", "description", "vanity_url_code",
                             "afk_channel_id", "system_channel_id", "rules_channel_id",
                             "public_updates_channel_id", "safety_alerts_channel_id")),
        }


    def _check_sent(self, payload: dict[str, Any]) -> None:
        self.contract.add(check_gateway(payload))


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    check: Callable[[dict[str, Any]], None]  # checks each payload against the gateway's schemas
    live: bool = False  # identified or resumed: receives dispatches

    async def send_dispatch(self, event: str, data: dict[str, Any], seq: int) -> None:
        await self.send({"op": 0, "t": event, "s": seq, "d": data})

    async def send(self, payload: dict[str, Any]) -> None:
        self.check(payload)
        if not self.ws.closed:
            await self.ws.send_json(payload)


def _json(payload: Any, *, status: int = 200) -> web.Response:
    # discord.py parses JSON only when the Content-Type is exactly application/json.
    headers = {"Content-Type": "application/json"}
    return web.Response(body=json.dumps(payload).encode(), status=status, headers=headers)


def _string_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _rest_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as REST answers it: without `guild_id` and `member`, the fields only the gateway's
    MESSAGE_CREATE adds (docs: Gateway Events > Message Create, "extra fields")."""
    rest = {key: value for key, value in message.items() if key not in ("guild_id", "member")}
    rest["mentions"] = [{k: v for k, v in user.items() if k != "member"} for user in message["mentions"]]
    return rest


def _invalid_form_body(violations: list[Any]) -> dict[str, Any]:
    """Discord's answer to a request its contract refuses: 50035 with each field's error."""
    errors: dict[str, Any] = {}
    for violation in violations:
        node = errors
        for part in (violation.field or "_body").split("."):
            node = node.setdefault(part, {})
        node.setdefault("_errors", []).append({"code": "CONTRACT_VIOLATION", "message": violation.message})
    return {"message": "Invalid Form Body", "code": 50035, "errors": errors}


def _rate_limited(retry_after: float) -> web.Response:
    # Without a Via header discord.py takes a 429 for a Cloudflare ban and gives up.
    headers = {
        "Content-Type": "application/json",
        "Via": "1.1 google",
        "Retry-After": str(max(1, round(retry_after))),
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset-After": str(retry_after),
        "X-RateLimit-Bucket": "fake-bucket",
        "X-RateLimit-Scope": "user",
    }
    body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
    return web.Response(body=json.dumps(body).encode(), status=429, headers=headers)
