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

from bot.config import Settings
from bot.engine import ReplyEngine
from bot.memory import open_store
from bot.web import STATE, build_app, is_loopback


class Adapter:
    """Stands in for a platform adapter (those live on their own branches): /readyz only reads these two."""

    def __init__(self, name: str, connected: bool) -> None:
        self.name = name
        self.connected = connected


@pytest.fixture
async def serve(tiny_model, make_settings: Callable[..., Settings]):
    """`await serve(**settings)` -> a client of the app on a real socket; all closed afterwards."""
    opened: list[TestClient] = []

    async def start(adapters=(), memory_url: str = "memory://", model=None, **overrides) -> TestClient:
        settings = make_settings(memory_url=memory_url, **overrides)
        engine = ReplyEngine(model or tiny_model, open_store(memory_url, max_turns=settings.memory_max_turns), settings)
        await engine.start()
        client = TestClient(TestServer(build_app(engine, settings, adapters), host="127.0.0.1", port=0))
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
        ("POST", "/api/reset", {"data": "nope"}, 400),
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
    assert (response.status, await response.json()) == (200, {"ready": True, "adapters": ["discord", "slack"]})
    await state.engine.store.close()  # the database goes away
    response = await client.get("/readyz")
    assert response.status == 503 and "memory store is unavailable" in (await response.json())["reason"]


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
