"""bot/web.py in-process over real HTTP (aiohttp's test server on port 0), with
the real engine over the tiny model: the error matrix, busy and closing
answers, readiness reasons and the access rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from model_doubles import GatedModel
from redis_servers import PrivateRedis

from bot.config import Settings
from bot.engine import ReplyEngine
from bot.memory import open_store
from bot.shared import SharedState
from bot.web import STATE, build_app
from bot.webaccess import is_loopback


class Adapter:
    """Stands in for a platform adapter: /readyz and /healthz only read these three."""

    def __init__(self, name: str, connected: bool, failure: str | None = None) -> None:
        self.name = name
        self.connected = connected
        self.failure = failure


@pytest.fixture
async def serve(tiny_model, make_settings: Callable[..., Settings]):
    """`await serve(**settings)` -> a client of the app on a real socket; all closed afterwards."""
    opened: list[TestClient] = []

    async def start(adapters=(), memory_url: str = "memory://", model=None, shared=None, **overrides) -> TestClient:
        settings = make_settings(memory_url=memory_url, **overrides)
        store = open_store(memory_url, max_turns=settings.memory_max_turns)
        engine = ReplyEngine(model or tiny_model, store, settings)
        await engine.start()
        client = TestClient(TestServer(build_app(engine, settings, adapters, shared=shared), host="127.0.0.1", port=0))
        await client.start_server()
        opened.append(client)
        return client

    yield start
    for client in opened:
        engine = client.server.app[STATE].engine
        await client.close()
        await engine.close(timeout=5)


@pytest.fixture
async def client(serve) -> TestClient:
    return await serve()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("{not json", 400, "bad_request"),
        ("[1, 2]", 400, "bad_request"),
        ('"hello"', 400, "bad_request"),
        ('{"text": "hi"}', 400, "bad_request"),
        ('{"conversation": 7, "text": "hi"}', 400, "bad_request"),
        ('{"conversation": "has space", "text": "hi"}', 400, "bad_request"),
        ('{"conversation": "' + "c" * 101 + '", "text": "hi"}', 400, "bad_request"),
        ('{"conversation": "", "text": "hi"}', 400, "bad_request"),
        ('{"conversation": "c"}', 400, "bad_request"),
        ('{"conversation": "c", "text": ["hi"]}', 400, "bad_request"),
        ('{"conversation": "c", "text": null}', 400, "bad_request"),
        ('{"conversation": "c", "text": "hi", "user": 12}', 400, "bad_request"),
        ('{"conversation": "c", "text": ""}', 400, "empty"),
        ('{"conversation": "c", "text": " \\u200b\\n\\t "}', 400, "empty"),
        ('{"conversation": "c", "text": "' + "x" * 2001 + '"}', 413, "too_long"),
        ("x" * (2 * 1024 * 1024), 413, "request_entity_too_large"),
    ],
)
async def test_bad_chat_requests_get_a_clear_json_4xx(client: TestClient, body: str, status: int, code: str) -> None:
    response = await client.post("/api/chat", data=body, headers={"Content-Type": "application/json"})
    data = await response.json()
    assert (response.status, data["code"]) == (status, code)
    assert data["error"].strip() and "Traceback" not in data["error"]
    # Nothing was stored for the bad request.
    history = await (await client.get("/api/history", params={"conversation": "c"})).json()
    assert history["exchanges"] == []


async def test_other_api_mistakes(client: TestClient) -> None:
    for method, path, kwargs, status in [
        ("GET", "/api/chat", {}, 405),
        ("GET", "/api/nothing-here", {}, 404),
        ("GET", "/api/history", {}, 400),
        ("GET", "/api/history?conversation=bad%20id", {}, 400),
        ("POST", "/api/reset", {"json": {}}, 400),
        ("POST", "/api/reset", {"data": "nope", "headers": {"Content-Type": "application/json"}}, 400),
    ]:
        response = await client.request(method, path, **kwargs)
        body = await response.json()
        assert response.status == status, (method, path)
        assert body["error"].strip()


async def test_chat_history_reset_round_trip(client: TestClient) -> None:
    response = await client.post("/api/chat", json={"conversation": "round", "text": "hi <b>there</b>", "user": "u1"})
    assert response.status == 200
    reply = (await response.json())["reply"]
    history = await (await client.get("/api/history", params={"conversation": "round"})).json()
    assert [(e["user"], e["bot"]) for e in history["exchanges"]] == [("hi <b>there</b>", reply)]
    engine = client.server.app[STATE].engine
    assert len(await engine.history("web:round")) == 1  # namespaced: web ids never meet a platform's
    assert await (await client.post("/api/reset", json={"conversation": "round"})).json() == {"reset": True}
    assert await (await client.post("/api/reset", json={"conversation": "round"})).json() == {"reset": False}


async def test_busy_engine_answers_503_with_retry_after(serve, tiny_model) -> None:
    model = GatedModel(tiny_model)
    model.gate.clear()  # the first reply is held in the model, so the queue stays full
    client = await serve(queue_size=1, model=model)
    first = asyncio.create_task(client.post("/api/chat", json={"conversation": "a", "text": "hello"}))
    await asyncio.to_thread(model.wait_for_calls, 1)
    response = await client.post("/api/chat", json={"conversation": "b", "text": "hello"})
    body = await response.json()
    assert (response.status, body["code"], response.headers["Retry-After"]) == (503, "busy", "5")
    model.gate.set()
    assert (await first).status == 200


async def test_closing_refuses_api_but_health_stays(client: TestClient) -> None:
    client.server.app[STATE].stop_accepting()
    response = await client.post("/api/chat", json={"conversation": "a", "text": "hello"})
    assert response.status == 503 and "Retry-After" in response.headers
    assert (await response.json())["code"] == "closed"
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503 and "shutting down" in (await ready.json())["reason"]


async def test_readyz_names_what_is_not_ready(serve, tmp_path: Path) -> None:
    client = await serve(
        adapters=[Adapter("discord", connected=False), Adapter("slack", connected=True)],
        memory_url=f"sqlite:///{tmp_path / 'm.db'}",
    )
    response = await client.get("/readyz")
    reason = (await response.json())["reason"]
    assert response.status == 503 and "discord is not connected" in reason and "slack" not in reason
    state = client.server.app[STATE]
    state.adapters[0].connected = True
    response = await client.get("/readyz")
    assert (response.status, await response.json()) == (
        200, {"ready": True, "adapters": ["discord", "slack"], "degraded": []}
    )
    await state.engine.store.close()  # the database goes away: the bot answers without history
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 200 and body["ready"] is True
    assert ["memory store is unavailable" in reason for reason in body["degraded"]] == [True]
    assert (await client.post("/api/chat", json={"conversation": "c", "text": "still there?"})).status == 200


async def test_metrics_content_type_and_page(client: TestClient) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert "\nblenderchat_queue_depth 0.0\n" in await response.text()
    page = await client.get("/")
    assert page.status == 200 and "/static/app.js" in await page.text()
    script = await client.get("/static/app.js")
    assert script.status == 200 and "/api/chat" in await script.text()


async def test_token_rules_on_a_non_loopback_address(serve) -> None:
    client = await serve(http_host="0.0.0.0", web_api_token="tok")
    chat = {"conversation": "t", "text": "hello"}
    assert (await client.post("/api/chat", json=chat)).status == 401
    for header in ("Bearer tok2", "Basic tok", "Bearer", "tok"):
        assert (await client.post("/api/chat", json=chat, headers={"Authorization": header})).status == 401
    response = await client.post("/api/chat", json=chat, headers={"Authorization": "Bearer tok"})
    assert response.status == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(open_path)).status == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("192.168.1.5", False), ("bot.example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_mounted_slack_events_stay_reachable_when_the_api_is_off(tiny_model, make_settings) -> None:
    """What SlackAdapter.mount does in HTTP mode: a route on our app, checked by Slack's signature, not our token."""
    from aiohttp import web

    settings = make_settings(http_host="0.0.0.0")  # no WEB_API_TOKEN: the API and page are off
    engine = ReplyEngine(tiny_model, open_store("memory://", max_turns=5), settings)
    await engine.start()
    app = build_app(engine, settings)

    async def events(request: web.Request) -> web.Response:
        return web.json_response({"got": (await request.json())["type"]})

    app.router.add_post("/slack/events", events)
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        response = await client.post("/slack/events", json={"type": "url_verification"})
        assert (response.status, await response.json()) == (200, {"got": "url_verification"})
        assert (await client.post("/api/chat", json={"conversation": "c", "text": "hi"})).status == 403
        assert (await client.get("/")).status == 403
    finally:
        await client.close()
        await engine.close(timeout=1)


# -- the web API's own limits (issue 12, item 3) -----------------------------------


async def test_a_client_sending_a_new_user_each_time_is_still_one_caller(serve) -> None:
    client = await serve(rate_limit_burst=5, rate_limit_per_minute=10, web_rate_limit_per_minute=3)
    statuses = []
    for i in range(5):
        response = await client.post("/api/chat", json={"conversation": f"c{i}", "text": "hi", "user": f"fresh-{i}"})
        statuses.append((response.status, (await response.json()).get("code")))
    assert statuses == [(200, None)] * 3 + [(429, "rate_limited")] * 2
    metrics = await (await client.get("/metrics")).text()
    assert 'blenderchat_replies_total{outcome="rate_limited",platform="web"} 2.0' in metrics


async def test_the_web_api_takes_at_most_its_share_of_the_queue(serve, tiny_model) -> None:
    model = GatedModel(tiny_model)
    client = await serve(model=model, queue_size=4, web_queue_percent=50)  # two web chats at once
    engine = client.server.app[STATE].engine
    model.gate.clear()
    held = [asyncio.create_task(client.post("/api/chat", json={"conversation": f"w{i}", "text": "hi"})) for i in range(2)]
    while engine.metrics.registry.get_sample_value("blenderchat_queue_depth") < 2:
        await asyncio.sleep(0.01)
    refused = await client.post("/api/chat", json={"conversation": "w9", "text": "hi"})
    assert (refused.status, (await refused.json())["code"]) == (503, "busy") and refused.headers["Retry-After"]
    discord = asyncio.create_task(engine.reply("discord:1", "hello", user="42", platform="discord"))  # still room
    while engine.metrics.registry.get_sample_value("blenderchat_queue_depth") < 3:
        await asyncio.sleep(0.01)
    model.gate.set()
    assert [response.status for response in await asyncio.gather(*held)] == [200, 200]
    assert await discord
    assert (await client.post("/api/chat", json={"conversation": "w9", "text": "hi"})).status == 200


async def test_blocked_users_name_web_users_by_their_user_else_their_conversation(serve) -> None:
    client = await serve(blocked_users=frozenset({"web:alice"}))

    async def chat(**body: str) -> tuple[int, str | None]:
        response = await client.post("/api/chat", json={"text": "hello", **body})
        return response.status, (await response.json()).get("code")

    assert await chat(conversation="c1", user="alice") == (403, "blocked_user")
    assert await chat(conversation="alice") == (403, "blocked_user")  # no user: the conversation is the user
    assert await chat(conversation="alice", user="bob") == (200, None)
    assert await chat(conversation="web:alice") == (200, None)  # "web:web:alice" is nobody


# -- who may use the page and the API (items 4 and 5) ---------------------------------


async def test_the_token_is_required_on_a_loopback_address_too(serve) -> None:
    client = await serve(http_host="127.0.0.1", web_api_token="tok")  # e.g. behind a TLS proxy on this host
    chat = {"conversation": "t", "text": "hello"}
    response = await client.post("/api/chat", json=chat)
    assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.get("/api/history", params={"conversation": "t"})).status == 401
    assert (await client.post("/api/chat", json=chat, headers={"Authorization": "Bearer tok"})).status == 200
    page = await client.get("/")  # the page holds nothing: it is served, and asks for the token
    assert page.status == 200 and "token-form" in await page.text()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
async def test_posts_need_a_json_content_type(client: TestClient, content_type: str) -> None:
    """A cross-site form or a "simple" fetch can only send these: they never reach the model."""
    body = '{"conversation": "c", "text": "hello"}'
    for path in ("/api/chat", "/api/reset"):
        response = await client.post(path, data=body, headers={"Content-Type": content_type})
        data = await response.json()
        assert (response.status, data["code"]) == (415, "unsupported_media_type"), path
        assert "application/json" in data["error"]
    history = await (await client.get("/api/history", params={"conversation": "c"})).json()
    assert history["exchanges"] == []
    ok = await client.post("/api/chat", data=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status == 200


async def test_only_this_servers_own_names_are_answered(serve, caplog) -> None:
    """DNS rebinding: a site whose name resolves to 127.0.0.1 is refused by its Host header."""
    client = await serve(web_allowed_hosts=frozenset({"bot.example.com", ".corp.example"}))
    chat = {"conversation": "h", "text": "hello"}
    port = client.server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "bot.example.com", "BOT.example.com:443",
                 "corp.example", "chat.corp.example"):
        response = await client.post("/api/chat", json=chat, headers={"Host": host})
        assert response.status == 200, host
    for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", "example.com", "notcorp.example"):
        response = await client.post("/api/chat", json=chat, headers={"Host": host})
        assert (response.status, (await response.json())["code"]) == (400, "unknown_host"), host
        page = await client.get("/", headers={"Host": host})
        assert page.status == 400 and "WEB_ALLOWED_HOSTS" in await page.text()
        assert (await client.get("/api/history", params={"conversation": "h"}, headers={"Host": host})).status == 400
    for open_path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers use any address
        assert (await client.get(open_path, headers={"Host": "10.1.2.3:8080"})).status == 200
    warnings = [r.getMessage() for r in caplog.records if "WEB_ALLOWED_HOSTS" in r.getMessage()]
    assert len(warnings) == 3  # once per name, never once per request


async def test_requests_from_other_sites_are_refused(serve) -> None:
    client = await serve(web_allowed_hosts=frozenset({"bot.example.com"}))
    chat = {"conversation": "o", "text": "hello"}
    own = f"http://127.0.0.1:{client.server.port}"
    assert (await client.post("/api/chat", json=chat, headers={"Origin": own})).status == 200
    # Behind the operator's proxy the page's origin is the public name.
    assert (await client.post("/api/chat", json=chat, headers={"Origin": "https://bot.example.com"})).status == 200
    for origin in ("https://attacker.example", "http://localhost:3000", f"http://127.0.0.1:{client.server.port + 1}",
                   "null"):
        response = await client.post("/api/chat", json=chat, headers={"Origin": origin})
        assert (response.status, (await response.json())["code"]) == (403, "cross_origin"), origin
        history = await client.get("/api/history", params={"conversation": "o"}, headers={"Origin": origin})
        assert history.status == 403, origin
    history = await (await client.get("/api/history", params={"conversation": "o"})).json()
    assert len(history["exchanges"]) == 2


# -- health and readiness (items 14 and 15) ---------------------------------------


async def test_healthz_fails_once_a_platform_stopped_for_good(serve) -> None:
    client = await serve(adapters=[Adapter("discord", connected=False), Adapter("slack", connected=True)])
    assert (await client.get("/healthz")).status == 200  # reconnecting: only /readyz says so
    assert (await client.get("/readyz")).status == 503
    client.server.app[STATE].adapters[0].failure = "DISCORD_TOKEN was rejected by Discord"
    response = await client.get("/healthz")
    assert (response.status, await response.json()) == (
        503, {"status": "failed", "reason": "discord: DISCORD_TOKEN was rejected by Discord"}
    )


async def test_readyz_stays_ready_when_redis_is_down_and_says_it_is_degraded(serve, tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)  # not started: Redis is down
    shared = SharedState.from_settings(Settings(memory_url="memory://", redis_url=server.url))
    try:
        client = await serve(shared=shared, adapters=[Adapter("slack", connected=True)])
        response = await client.get("/readyz")
        body = await response.json()
        assert response.status == 200 and body["ready"] is True and body["adapters"] == ["slack"]
        assert len(body["degraded"]) == 1 and "Redis" in body["degraded"][0]
        metrics = await (await client.get("/metrics")).text()
        assert 'blenderchat_dependency_up{dependency="redis"} 0.0' in metrics
        assert 'blenderchat_dependency_up{dependency="memory"} 1.0' in metrics
        assert (await client.post("/api/chat", json={"conversation": "r", "text": "hello"})).status == 200
        server.start()
        body = await (await client.get("/readyz")).json()
        assert body["degraded"] == []
        assert 'blenderchat_dependency_up{dependency="redis"} 1.0' in await (await client.get("/metrics")).text()
    finally:
        await shared.close()
        server.stop()
