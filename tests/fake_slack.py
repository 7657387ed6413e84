"""A local fake of Slack for tests: the Web API and the Socket Mode websocket.

One aiohttp server on 127.0.0.1 (port 0). `FakeSlack.api_url` is what
SLACK_API_URL points at; `apps.connections.open` hands out its own
`ws://127.0.0.1:.../socket` URL. Every Web API call is recorded; a method can
be told to answer one 429 with Retry-After or to do its next call but withhold
the answer (`hold_response`), and a scope can be withheld so the methods needing
it answer `missing_scope`. It keeps what users would see: the messages posted
(and those a test adds) per channel, read back by `conversations.history` and
`conversations.replies`; and of the AI-app surface each thread's assistant
status, the reactions, the published Home tabs, ephemeral messages. The
websocket side sends `events_api` and `interactive` envelopes, records the
client's acks and can ask it to reconnect.
`chat.update` edits the bot's stored messages.

Every call and answer is checked against Slack's published contracts
(tests/slack_contract.py, tests/contracts/slack/): a call missing a required
argument or over a documented limit is answered `invalid_arguments` (or
`invalid_blocks`), as Slack would; it, and any answer of the fake's own that does not validate, is recorded
in `violations`. The events the helpers below build are checked against Slack's
samples as they are built. `close()` fails if any violation is left, so the test
that caused it fails, naming the method and the argument.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import WSMsgType, web
from slack_contract import check_call, check_event, check_experience, check_response, manifest_experience
from slack_sdk.signature import SignatureVerifier

BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
TEAM_ID = "T1"
# Reading a conversation needs the history scope of its kind (see FakeSlack.channel_kind).
HISTORY_SCOPES = {"public": "channels:history", "private": "groups:history", "im": "im:history", "mpim": "mpim:history"}
# The scope each method needs (only those a test withholds matter): one, one per kind of conversation,
# or a tuple of scopes any one of which will do.
SCOPES: dict[str, str | dict[str, str] | tuple[str, ...]] = {
    # Slack's reference: chat:write, and assistant:write still accepted "for the time being".
    "assistant.threads.setStatus": ("chat:write", "assistant:write"),
    "assistant.threads.setSuggestedPrompts": "assistant:write",
    "reactions.add": "reactions:write",
    "reactions.remove": "reactions:write",
    "conversations.history": HISTORY_SCOPES,
    "conversations.replies": HISTORY_SCOPES,
}


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None
    status: int = 200
    response_ts: str | None = None  # chat.postMessage: the ts of the message created
    at: float = field(default_factory=time.time)  # when the fake received it


@dataclass
class FakeSlack:
    users: dict[str, str] = field(default_factory=lambda: {"U2": "Alice", "U3": "Bob"})
    # users.info's `is_admin` / `is_owner` (Slack's role flags; java-slack-sdk's users.info sample has both).
    admins: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    responses: list[dict[str, Any]] = field(default_factory=list)  # what was POSTed to a command's response_url
    calls: list[Call] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    missing_scopes: set[str] = field(default_factory=set)
    statuses: dict[tuple[str, str], str] = field(default_factory=dict)  # (channel, thread) -> its status now
    reactions: set[tuple[str, str, str]] = field(default_factory=set)  # (channel, ts, name) on messages now
    home_views: dict[str, dict[str, Any]] = field(default_factory=dict)  # user -> published Home tab
    # (channel, thread_ts or None) -> the suggested prompts (with their title) shown there now.
    suggested: dict[tuple[str, str | None], dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # channel -> its messages, as stored
    mpims: set[str] = field(default_factory=set)  # channels that are group DMs (their ids do not tell)
    withheld: list[Call] = field(default_factory=list)  # calls done whose answer hold_response keeps back now
    _holds: list[str] = field(default_factory=list)  # methods whose next answer is withheld
    _delays: list[tuple[str, float]] = field(default_factory=list)  # (method, seconds) to hold a call before doing it
    held: int = 0  # calls `delay` is holding back right now
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set by close(): held calls go on
    _release: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) by release_held()
    _closing: bool = False
    _rate_limit: dict[str, int] = field(default_factory=dict)
    _breaks: list[tuple[str, str]] = field(default_factory=list)  # (method, "disconnect" | "payload")
    revoked: bool = False  # the bot token was revoked: every call with it answers token_revoked
    violations: list[str] = field(default_factory=list)  # breaches of Slack's contracts, see close()
    # The app's messaging experience, as slack-manifest.yml declares it: "agent" or "assistant" (legacy).
    experience: str = field(default_factory=manifest_experience)
    # Seconds every chat.postMessage takes before Slack does it: (shortest, longest), drawn by `latency_rng`.
    post_latency: tuple[float, float] | None = None
    latency_rng: random.Random = field(default_factory=random.Random)
    _runner: web.AppRunner | None = None
    _port: int = 0

    # -- server ----------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/commands/{id}", self._respond)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        """Stop the server; then fail if a call or an answer broke Slack's contracts."""
        self._closing = True
        self._stopping.set()
        self.release_held()
        for ws in self.sockets:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.assert_no_violations()

    def assert_no_violations(self) -> None:
        if self.violations:
            found, self.violations = list(dict.fromkeys(self.violations)), []
            raise AssertionError("Slack contract violations:\n  " + "\n  ".join(found))

    def take_violations(self) -> list[str]:
        """The violations so far, forgotten (for tests that break the contracts on purpose)."""
        found, self.violations = self.violations, []
        return found

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    # -- Web API ---------------------------------------------------------

    def rate_limit_once(self, method: str, retry_after: int = 1) -> None:
        """The next call of `method` gets a 429 with this Retry-After."""
        self._rate_limit[method] = retry_after

    def break_next(self, method: str, how: str, *, times: int = 1) -> None:
        """The next `times` calls of `method`: "disconnect" closes the connection before
        answering (nothing done); "done-disconnect" does the call, then closes the connection
        before answering (the answer is lost on the way back); "payload" does the call, then
        breaks off its answer."""
        self._breaks += [(method, how)] * times

    def delay(self, method: str, seconds: float) -> None:
        """Hold the next call of `method` for `seconds` (or until `close()`) before doing it: the
        request is on its way, Slack has not done it yet (a process killed now never posts it)."""
        self._delays.append((method, seconds))

    def hold_response(self, method: str) -> None:
        """Do the next call of `method` as usual (recorded, a message stored) but leave its connection
        open, unanswered, until `release_held()` or `close()`: Slack did it, the client never learned that."""
        self._holds.append(method)

    def release_held(self) -> None:
        """Send every answer `hold_response` is keeping back now."""
        self._release.set()
        self._release = asyncio.Event()  # later holds wait for the next release

    def add_message(self, channel: str, ts: str, text: str, user: str, thread_ts: str | None = None) -> dict[str, Any]:
        """Store a user's message as Slack would have it (e.g. the mention a thread hangs off); returns it."""
        message = {"type": "message", "ts": ts, "user": user, "text": text, "team": TEAM_ID}
        if thread_ts:
            message["thread_ts"] = thread_ts
        self.messages.setdefault(channel, []).append(message)
        return message

    def channel_kind(self, channel: str) -> str:
        """Which history scope reading `channel` needs: "public", "private", "im" or "mpim"."""
        if channel in self.mpims:
            return "mpim"
        return {"D": "im", "G": "private"}.get(channel[:1], "public")

    def calls_to(self, method: str, *, ok_only: bool = True) -> list[Call]:
        return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    @property
    def posts(self) -> list[Call]:
        return self.calls_to("chat.postMessage")

    @property
    def thinking(self) -> bool:
        """Whether any sign of the bot thinking is still up: a thread status or a reaction."""
        return any(self.statuses.values()) or bool(self.reactions)

    def status_calls(self, channel: str | None = None) -> list[Call]:
        return [c for c in self.calls_to("assistant.threads.setStatus")
                if channel is None or c.params["channel_id"] == channel]

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        raw = await request.read()
        if raw:
            if request.content_type == "application/json":
                params.update(json.loads(raw))
            else:
                params.update(parse_qsl(raw.decode()))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") or params.get("token")
        problems = check_call(method, params, token)
        if problems:
            # Slack's answer to a call it cannot take; the test fails at close() too, even where
            # the bot shrugs the error off.
            self.violations += problems
            self.calls.append(Call(method, params, token, status=400))
            # A message's blocks out of Block Kit's limits are `invalid_blocks` to Slack.
            blocks_only = all(": argument `blocks`" in problem for problem in problems)
            return web.json_response({"ok": False, "error": "invalid_blocks" if blocks_only else "invalid_arguments",
                                      "response_metadata": {"messages": problems}})  # fmt: skip
        self.violations += check_experience(method, params, self.experience)  # Slack says ok, does nothing
        broken = next((b for b in self._breaks if b[0] == method), None)
        if broken is not None:
            self._breaks.remove(broken)
            if broken[1] == "disconnect":
                self.calls.append(Call(method, params, token, status=0))
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)  # never delivered
            if broken[1] == "done-disconnect":
                self.calls.append(Call(method, params, token))
                self._checked(method, self._answer(method, params, token))
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)  # never delivered
            self.calls.append(Call(method, params, token))
            body = json.dumps(self._checked(method, self._answer(method, params, token))).encode()
            response = web.StreamResponse(headers={"Content-Type": "application/json",
                                                   "Content-Length": str(len(body))})  # fmt: skip
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        if method == "chat.postMessage" and self.post_latency is not None:
            await asyncio.sleep(self.latency_rng.uniform(*self.post_latency))
        delay = next((d for d in self._delays if d[0] == method), None)
        if delay is not None:
            self._delays.remove(delay)
            self.held += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), delay[1])
            except TimeoutError:
                pass
            finally:
                self.held -= 1
        if method in self._rate_limit:
            retry_after = self._rate_limit.pop(method)
            self.calls.append(Call(method, params, token, status=429))
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)}
            )
        scope = self._scope_needed(method, params)
        if scope in self.missing_scopes:
            self.calls.append(Call(method, params, token, status=403))
            provided = ",".join(s for s in ("chat:write", "im:history") if s not in self.missing_scopes)
            return web.json_response({"ok": False, "error": "missing_scope", "needed": scope, "provided": provided})
        call = Call(method, params, token)
        self.calls.append(call)
        answer = self._checked(method, self._answer(method, params, token))
        if method in self._holds:
            self._holds.remove(method)
            await self._withhold(call)
        return web.json_response(answer)

    def _checked(self, method: str, answer: dict[str, Any]) -> dict[str, Any]:
        """The fake's answer, recorded as a violation where it is not what Slack documents."""
        self.violations += check_response(method, answer)
        return answer

    def _scope_needed(self, method: str, params: dict[str, Any]) -> str | None:
        scope = SCOPES.get(method)
        if isinstance(scope, dict):
            return scope[self.channel_kind(str(params.get("channel", "")))]
        if isinstance(scope, tuple):  # the first one granted; all missing: the first is named
            return next((s for s in scope if s not in self.missing_scopes), scope[0])
        return scope

    async def _withhold(self, call: Call) -> None:
        """Keep the answer to `call` back until release_held() or close()."""
        if self._closing:
            return
        release = self._release
        self.withheld.append(call)
        try:
            await release.wait()
        finally:
            self.withheld = [c for c in self.withheld if c is not call]

    def _answer(self, method: str, params: dict[str, Any], token: str | None) -> dict[str, Any]:
        if self.revoked and (token or "").startswith("xoxb-"):
            return {"ok": False, "error": "token_revoked"}
        if method == "auth.test":
            if not (token or "").startswith("xoxb-"):
                return {"ok": False, "error": "invalid_auth"}
            return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "blenderbot",
                    "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": BOT_ID, "is_enterprise_install": False}
        if method == "apps.connections.open":
            if not (token or "").startswith("xapp-"):
                return {"ok": False, "error": "invalid_auth"}
            return {"ok": True, "url": f"ws://127.0.0.1:{self._port}/socket?ticket={uuid.uuid4().hex}"}
        if method == "chat.postMessage":
            message = self._store_post(params)
            self.calls[-1].response_ts = message["ts"]
            shown = {key: value for key, value in message.items() if key != "metadata"}
            return {"ok": True, "channel": params.get("channel"), "ts": message["ts"], "message": shown}
        if method == "chat.update":
            return self._update(params)
        if method == "conversations.history":
            return self._history(params)
        if method == "conversations.replies":
            return self._replies(params)
        if method == "reactions.add":
            self.reactions.add((params["channel"], params["timestamp"], params["name"]))
            return {"ok": True}
        if method == "reactions.remove":
            self.reactions.discard((params["channel"], params["timestamp"], params["name"]))
            return {"ok": True}
        if method == "assistant.threads.setStatus":
            self.statuses[(params["channel_id"], params["thread_ts"])] = params["status"]
            return {"ok": True}
        if method == "assistant.threads.setSuggestedPrompts":
            return self._suggest(params)
        if method == "views.publish":
            view = params["view"] if isinstance(params["view"], dict) else json.loads(params["view"])
            self.home_views[params["user_id"]] = view
            return {"ok": True, "view": {"id": "V" + uuid.uuid4().hex[:8].upper(), **view}}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": new_ts()}
        if method == "users.info":
            user = params.get("user")
            if user not in self.users:
                return {"ok": False, "error": "user_not_found"}
            return {"ok": True, "user": {**_user(user, self.users[user]), "is_admin": user in self.admins,
                                         "is_owner": user in self.owners, "is_primary_owner": False}}
        return {"ok": False, "error": "unknown_method"}

    def _suggest(self, params: dict[str, Any]) -> dict[str, Any]:
        """assistant.threads.setSuggestedPrompts as its reference page says: `thread_ts` only in the
        legacy assistant experience; an agent app's call with it "silently fails" (ok, nothing shown);
        without it the prompts go to the latest message in the channel, here kept under (channel, None)."""
        thread = params.get("thread_ts")
        if thread and self.experience == "agent":
            return {"ok": True}
        prompts = params["prompts"] if isinstance(params["prompts"], list) else json.loads(params["prompts"])
        self.suggested[(params["channel_id"], thread or None)] = {"title": params.get("title"), "prompts": prompts}
        return {"ok": True}

    # -- the message store -----------------------------------------------

    def _store_post(self, params: dict[str, Any]) -> dict[str, Any]:
        """Keep what chat.postMessage posts as Slack stores it. Form bodies carry blocks and
        metadata JSON-encoded, JSON bodies as they are."""
        # The module's ts counter, which user events use too: ts order is the order things happened.
        message: dict[str, Any] = {
            "type": "message",
            "ts": new_ts(),
            "user": BOT_USER_ID,
            "bot_id": BOT_ID,
            "team": TEAM_ID,
            "text": params.get("text") or "",
        }
        if params.get("thread_ts"):
            message["thread_ts"] = str(params["thread_ts"])
        for key in ("blocks", "metadata"):
            value = params.get(key)
            if value:
                message[key] = json.loads(value) if isinstance(value, str) else value
        self.messages.setdefault(str(params.get("channel", "")), []).append(message)
        return message

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        """chat.update (its reference page, and the shape of the Java SDK's chat.update sample): the
        message at `channel` + `ts` gets the new text and blocks and an `edited` mark; only the
        bot's own messages can be updated."""
        channel, ts = str(params.get("channel", "")), str(params.get("ts", ""))
        message = next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if message.get("user") != BOT_USER_ID:
            return {"ok": False, "error": "cant_update_message"}
        message["text"] = params.get("text") or ""
        blocks = params.get("blocks")
        if blocks:
            message["blocks"] = json.loads(blocks) if isinstance(blocks, str) else blocks
        else:
            message.pop("blocks", None)
        message["edited"] = {"user": BOT_USER_ID, "ts": new_ts()}
        shown = {key: value for key, value in message.items() if key != "metadata"}
        return {"ok": True, "channel": channel, "ts": ts, "text": message["text"], "message": shown}

    def _history(self, params: dict[str, Any]) -> dict[str, Any]:
        """conversations.history: the channel's top-level messages (thread parents among them), newest
        first, after `oldest` and before `latest` (either one included only with `inclusive`)."""
        channel = str(params.get("channel", ""))
        oldest, latest = _ts_key(params.get("oldest") or "0"), params.get("latest")
        inclusive = _true(params.get("inclusive"))

        def in_range(ts: str) -> bool:
            key = _ts_key(ts)
            after = key > oldest or (inclusive and key == oldest)
            before = latest is None or key < _ts_key(latest) or (inclusive and key == _ts_key(latest))
            return after and before

        top = [m for m in self._stored(channel) if m.get("thread_ts", m["ts"]) == m["ts"] and in_range(m["ts"])]
        top.reverse()
        limit = _limit(params, 100)
        shown = [self._shown(channel, m, _true(params.get("include_all_metadata"))) for m in top[:limit]]
        # Required by the OpenAPI schema of conversations.history; the fake keeps no pins.
        return {"ok": True, "messages": shown, "has_more": len(top) > limit, "pin_count": 0,
                "channel_actions_ts": None, "channel_actions_count": 0}

    def _replies(self, params: dict[str, Any]) -> dict[str, Any]:
        """conversations.replies: a thread oldest first, its parent first; a message that starts no thread,
        or a reply's ts, answers that message alone. Replies under a parent the fake never stored (a user's
        message no test added) come without it."""
        channel, ts = str(params.get("channel", "")), str(params.get("ts", ""))
        stored = self._stored(channel)
        message = next((m for m in stored if m["ts"] == ts), None)
        if message is not None and message.get("thread_ts", ts) != ts:
            thread = [message]
        else:
            thread = [m for m in stored if m["ts"] == ts or m.get("thread_ts") == ts]
        if not thread:
            return {"ok": False, "error": "thread_not_found"}
        limit = _limit(params, 1000)
        shown = [self._shown(channel, m, _true(params.get("include_all_metadata"))) for m in thread[:limit]]
        return {"ok": True, "messages": shown, "has_more": len(thread) > limit}

    def _stored(self, channel: str) -> list[dict[str, Any]]:
        """The channel's messages, oldest first."""
        return sorted(self.messages.get(channel, []), key=lambda m: _ts_key(m["ts"]))

    def _shown(self, channel: str, message: dict[str, Any], with_metadata: bool) -> dict[str, Any]:
        """A stored message as the read methods return it: metadata only when asked for all of
        it; a thread parent with its reply summary, a reply with its parent's author."""
        shown = {key: value for key, value in message.items() if key != "metadata" or with_metadata}
        ts, thread_ts = message["ts"], message.get("thread_ts")
        if thread_ts and thread_ts != ts:
            parent = next((m for m in self.messages.get(channel, []) if m["ts"] == thread_ts), None)
            if parent is not None:
                shown["parent_user_id"] = parent["user"]
            return shown
        replies = [m for m in self._stored(channel) if m.get("thread_ts") == ts and m["ts"] != ts]
        if replies:
            users = list(dict.fromkeys(m["user"] for m in replies))
            shown.update(
                subscribed=False,  # whether the reader follows the thread (the bot does not)
                thread_ts=ts,
                reply_count=len(replies),
                reply_users=users,
                reply_users_count=len(users),
                latest_reply=replies[-1]["ts"],
            )
        return shown

    # -- slash commands --------------------------------------------------

    def slash_command(self, command: str, text: str, *, user: str = "U2", channel: str = "C1",
                      team: str = TEAM_ID) -> dict[str, Any]:
        """The payload of a slash command, with the fields Slack documents for one (bolt-js's
        `SlashCommand` type lists the same): its `response_url` is this fake's."""
        return {
            "token": "unused", "team_id": team, "team_domain": "fake", "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "general", "user_id": user,
            "user_name": self.users.get(user, user).lower(), "command": command, "text": text,
            "api_app_id": "A1", "is_enterprise_install": "false",
            "response_url": f"http://127.0.0.1:{self._port}/commands/{uuid.uuid4().hex}",
            "trigger_id": f"{new_ts()}.{uuid.uuid4().hex[:12]}",
        }

    async def _respond(self, request: web.Request) -> web.Response:
        """A POST to a command's response_url: JSON with `text` (and `response_type`), answered "ok"."""
        body = await request.json()
        assert isinstance(body.get("text"), str), body
        self.responses.append(body)
        return web.Response(text="ok")

    async def send_slash_command(self, payload: dict[str, Any]) -> str:
        """Send a `slash_commands` envelope (Socket Mode) on the newest connection; its envelope_id."""
        envelope_id = uuid.uuid4().hex
        await self.open_sockets[-1].send_json({
            "envelope_id": envelope_id, "type": "slash_commands", "payload": payload, "accepts_response_payload": True,
        })
        return envelope_id

    # -- Socket Mode -----------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"}})
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                self.acks.append(json.loads(message.data))
        return ws

    @property
    def open_sockets(self) -> list[web.WebSocketResponse]:
        return [ws for ws in self.sockets if not ws.closed]

    async def send_envelope(
        self, body: dict[str, Any], *, retry_attempt: int = 0, envelope_id: str | None = None
    ) -> str:
        """Send an events_api envelope on the newest open connection; returns its envelope_id."""
        self.violations += check_event(body)
        envelope_id = envelope_id or uuid.uuid4().hex
        await self.open_sockets[-1].send_json({
            "envelope_id": envelope_id, "type": "events_api", "payload": body, "accepts_response_payload": False,
            "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else "",
        })
        return envelope_id

    async def send_interactive(self, payload: dict[str, Any]) -> str:
        """Send an `interactive` envelope (a button click...) on the newest connection; its envelope_id."""
        self.violations += check_event(payload)
        envelope_id = uuid.uuid4().hex
        await self.open_sockets[-1].send_json({
            "envelope_id": envelope_id, "type": "interactive", "payload": payload, "accepts_response_payload": True,
        })
        return envelope_id

    async def send_disconnect(self) -> None:
        await self.open_sockets[-1].send_json({"type": "disconnect", "reason": "refresh_requested"})

    def acked(self, envelope_id: str) -> bool:
        return any(ack.get("envelope_id") == envelope_id for ack in self.acks)


def _user(user: str, display_name: str) -> dict[str, Any]:
    """A person as users.info describes them: the fields Slack's OpenAPI schema requires of a
    user and a profile, empty where the fake knows nothing."""
    profile = {key: "" for key in ("real_name", "avatar_hash", "real_name_normalized", "title", "phone", "skype",
                                   "status_text", "status_emoji")}  # fmt: skip
    profile.update(display_name=display_name, display_name_normalized=display_name, fields=None)
    return {"id": user, "team_id": TEAM_ID, "name": display_name.lower(), "deleted": False, "profile": profile,
            "is_bot": False, "is_app_user": False, "updated": 1700000000}


def _ts_key(ts: str) -> tuple[int, int]:
    """A message ts ("1700000000.000123") as two numbers, to order and compare exactly (a float cannot)."""
    seconds, _, fraction = str(ts).partition(".")
    return int(seconds or 0), int(fraction.ljust(6, "0"))


def _true(value: Any) -> bool:
    """A boolean argument as slack_sdk sends it: "1"/"0" in a query, true/false in JSON."""
    return str(value).lower() in ("1", "true")


def _limit(params: dict[str, Any], default: int) -> int:
    limit = int(params.get("limit") or 0)
    return limit if limit > 0 else default


# -- building and signing events ------------------------------------------

def event_body(event: dict[str, Any], *, team: str = TEAM_ID, event_id: str | None = None,
               check: bool = True) -> dict[str, Any]:
    """An Events API `event_callback` body around `event`, in the shape of Slack's samples of
    that event (checked; `check=False` only for a payload that is malformed on purpose)."""
    body = {
        "token": "unused", "team_id": team, "api_app_id": "A1", "type": "event_callback",
        "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(), "event_time": int(time.time()),
        "event": {"event_ts": event.get("ts"), **event},
        "authorizations": [{"team_id": team, "user_id": BOT_USER_ID, "is_bot": True}],
    }
    return _shaped(body) if check else body


def _shaped(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload`, once it has the shape of Slack's sample of it."""
    problems = check_event(payload)
    assert not problems, "Slack payload unlike Slack's samples:\n  " + "\n  ".join(problems)
    return payload


_message_ts = itertools.count(1)


def new_ts() -> str:
    return f"{int(time.time())}.{next(_message_ts):06d}"


def mention(text: str, *, channel: str = "C1", user: str = "U2", thread_ts: str | None = None) -> dict[str, Any]:
    event = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER_ID}> {text}", "ts": new_ts(),
             "channel": channel}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def dm(text: str, *, channel: str = "D1", user: str = "U2", **extra: Any) -> dict[str, Any]:
    """A `message.im` event (the fields of its reference page's example); `thread_ts=` for a reply in a thread."""
    return {"type": "message", "channel_type": "im", "user": user, "text": text, "ts": new_ts(), "channel": channel,
            **extra}


def home_opened(tab: str, *, user: str = "U2", channel: str = "D1") -> dict[str, Any]:
    """An `app_home_opened` event: the person opened the bot's Home or Messages tab (the fields of the
    event's reference example and java-slack-sdk's AppHomeOpenedPayload; `view` only comes with a Home tab
    published before, so it is left out). In the agent experience `tab == "messages"` starts a DM."""
    return {"type": "app_home_opened", "user": user, "channel": channel, "tab": tab, "event_ts": new_ts()}


def thread_started(*, user: str = "U2", channel: str = "D1") -> dict[str, Any]:
    """An `assistant_thread_started` event (its reference page's example): the person opened a new
    assistant thread. Only apps on the legacy assistant experience (`assistant_view`) get it."""
    ts = new_ts()
    return {"type": "assistant_thread_started", "event_ts": ts,
            "assistant_thread": {"user_id": user, "channel_id": channel, "thread_ts": ts,
                                 "context": {"channel_id": None, "team_id": None, "enterprise_id": None}}}


def block_actions(action: dict[str, Any], *, user: str = "U2", message: dict[str, Any] | None = None,
                  channel: str | None = None, view: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `block_actions` payload: `user` clicked `action` on a message (or on the Home tab `view`)."""
    payload: dict[str, Any] = {
        "type": "block_actions", "api_app_id": "A1", "token": "unused", "trigger_id": "1.2.3",
        "team": {"id": TEAM_ID, "domain": "fake"}, "enterprise": None, "is_enterprise_install": False,
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "actions": [{"action_ts": new_ts(), **action}],
    }
    if message is not None:
        payload["container"] = {"type": "message", "message_ts": message["ts"], "channel_id": channel,
                                "is_ephemeral": False}
        payload["channel"] = {"id": channel, "name": "directmessage" if channel.startswith("D") else "general"}
        payload["message"] = message
    if view is not None:
        payload["container"] = {"type": "view", "view_id": "V1"}
        payload["view"] = view
    return _shaped(payload)


def clicked(post: Call, rating: str) -> dict[str, Any]:
    """The action a click on `post`'s feedback button for `rating` sends (from the blocks posted)."""
    actions = next(b for b in json_blocks(post) if b["type"] == "context_actions")
    buttons = actions["elements"][0]
    button = buttons["positive_button" if rating == "good" else "negative_button"]
    return {"type": "feedback_buttons", "action_id": buttons["action_id"], "block_id": actions.get("block_id", "b1"),
            "value": button["value"], "text": button["text"]}


def json_blocks(post: Call) -> list[dict[str, Any]]:
    blocks = post.params.get("blocks") or []
    return json.loads(blocks) if isinstance(blocks, str) else blocks


def message_of(post: Call) -> dict[str, Any]:
    """The message a `chat.postMessage` call created, as Slack puts it in a payload."""
    message = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "text": post.params["text"],
               "ts": post.response_ts, "blocks": json_blocks(post)}
    if post.params.get("thread_ts"):
        message["thread_ts"] = post.params["thread_ts"]
    return message


def form_body(payload: dict[str, Any]) -> str:
    """How Slack POSTs an interaction in HTTP mode: form-encoded, the JSON in `payload`."""
    return urlencode({"payload": json.dumps(payload)})


def signed_headers(secret: str, body: str, *, timestamp: str | None = None,
                   content_type: str = "application/json") -> dict[str, str]:
    """Headers Slack would send with `body`, signed the way slack_sdk verifies them."""
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature or "",
            "Content-Type": content_type}


async def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until `condition()` is truthy; its value, or AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
