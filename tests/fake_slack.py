"""A local fake of Slack for tests: the Web API and the Socket Mode websocket.

One aiohttp server on 127.0.0.1 (port 0). `FakeSlack.api_url` is what
SLACK_API_URL points at; `apps.connections.open` hands out its own
`ws://127.0.0.1:.../socket` URL. Every Web API call is recorded; a method can
be told to answer one 429 with Retry-After; the websocket side sends
`events_api` envelopes, records the client's acks and can ask it to reconnect.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from slack_sdk.signature import SignatureVerifier

BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
TEAM_ID = "T1"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None
    status: int = 200


@dataclass
class FakeSlack:
    users: dict[str, str] = field(default_factory=lambda: {"U2": "Alice", "U3": "Bob"})
    calls: list[Call] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _rate_limit: dict[str, int] = field(default_factory=dict)
    _breaks: list[tuple[str, str]] = field(default_factory=list)  # (method, "disconnect" | "payload")
    revoked: bool = False  # the bot token was revoked: every call with it answers token_revoked
    _runner: web.AppRunner | None = None
    _port: int = 0
    _ts: itertools.count = field(default_factory=lambda: itertools.count(1))

    # -- server ----------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    # -- Web API ---------------------------------------------------------

    def rate_limit_once(self, method: str, retry_after: int = 1) -> None:
        """The next call of `method` gets a 429 with this Retry-After."""
        self._rate_limit[method] = retry_after

    def break_next(self, method: str, how: str, *, times: int = 1) -> None:
        """The next `times` calls of `method`: "disconnect" closes the connection before
        answering (nothing done); "payload" does the call, then breaks off its answer."""
        self._breaks += [(method, how)] * times

    def calls_to(self, method: str, *, ok_only: bool = True) -> list[Call]:
        return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    @property
    def posts(self) -> list[Call]:
        return self.calls_to("chat.postMessage")

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
        broken = next((b for b in self._breaks if b[0] == method), None)
        if broken is not None:
            self._breaks.remove(broken)
            if broken[1] == "disconnect":
                self.calls.append(Call(method, params, token, status=0))
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)  # never delivered
            self.calls.append(Call(method, params, token))
            body = json.dumps(self._answer(method, params, token)).encode()
            response = web.StreamResponse(headers={"Content-Type": "application/json",
                                                   "Content-Length": str(len(body))})  # fmt: skip
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        if method in self._rate_limit:
            retry_after = self._rate_limit.pop(method)
            self.calls.append(Call(method, params, token, status=429))
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)}
            )
        self.calls.append(Call(method, params, token))
        return web.json_response(self._answer(method, params, token))

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
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            return {"ok": True, "channel": params.get("channel"), "ts": ts,
                    "message": {"text": params.get("text"), "user": BOT_USER_ID, "bot_id": BOT_ID, "ts": ts}}
        if method in ("reactions.add", "reactions.remove"):
            return {"ok": True}
        if method == "users.info":
            user = params.get("user")
            if user not in self.users:
                return {"ok": False, "error": "user_not_found"}
            return {"ok": True, "user": {"id": user, "name": self.users[user].lower(),
                                         "profile": {"display_name": self.users[user], "real_name": ""}}}
        return {"ok": False, "error": "unknown_method"}

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
        envelope_id = envelope_id or uuid.uuid4().hex
        await self.open_sockets[-1].send_json({
            "envelope_id": envelope_id, "type": "events_api", "payload": body, "accepts_response_payload": False,
            "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else "",
        })
        return envelope_id

    async def send_disconnect(self) -> None:
        await self.open_sockets[-1].send_json({"type": "disconnect", "reason": "refresh_requested"})

    def acked(self, envelope_id: str) -> bool:
        return any(ack.get("envelope_id") == envelope_id for ack in self.acks)


# -- building and signing events ------------------------------------------

def event_body(event: dict[str, Any], *, team: str = TEAM_ID, event_id: str | None = None) -> dict[str, Any]:
    """An Events API `event_callback` body around `event`."""
    return {
        "token": "unused", "team_id": team, "api_app_id": "A1", "type": "event_callback",
        "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(), "event_time": int(time.time()),
        "event": {"event_ts": event.get("ts"), **event},
        "authorizations": [{"team_id": team, "user_id": BOT_USER_ID, "is_bot": True}],
    }


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
    return {"type": "message", "channel_type": "im", "user": user, "text": text, "ts": new_ts(), "channel": channel,
            **extra}


def signed_headers(secret: str, body: str, *, timestamp: str | None = None) -> dict[str, str]:
    """Headers Slack would send with `body`, signed the way slack_sdk verifies them."""
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature or "",
            "Content-Type": "application/json"}


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
