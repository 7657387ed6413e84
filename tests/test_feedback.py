"""Ratings of replies outside Slack and Discord: the engine's `respond`/`rate`, the
web API (`POST /api/feedback` to rate, `GET /api/feedback` for the operator) over
real HTTP, the metrics, and `/good` / `/bad` in the terminal chat."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import subprocess_env
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)

from bot.chat import HELP
from bot.config import Settings
from bot.engine import ReplyEngine
from bot.memory import ExchangeRef, open_store
from bot.web import STATE, build_app


def counted(engine: ReplyEngine, platform: str, rating: str) -> float:
    for family in text_string_to_metric_families(engine.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "blenderchat_feedback_total" and sample.labels == {"platform": platform,
                                                                               "rating": rating}:
                return sample.value
    raise AssertionError(f"no blenderchat_feedback_total sample for {platform}/{rating}")


@pytest.fixture
async def serve(tiny_model, make_settings: Callable[..., Settings], tmp_path):
    opened: list[TestClient] = []

    async def start(**overrides) -> TestClient:
        settings = make_settings(**{"memory_url": f"sqlite:///{tmp_path}/memory.db", **overrides})
        engine = ReplyEngine(tiny_model, open_store(settings.memory_url, max_turns=3), settings)
        await engine.start()
        client = TestClient(TestServer(build_app(engine, settings), host="127.0.0.1", port=0))
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


async def chat(client: TestClient, conversation: str, text: str, **extra) -> dict:
    response = await client.post("/api/chat", json={"conversation": conversation, "text": text, **extra})
    assert response.status == 200, await response.text()
    return await response.json()


async def test_engine_respond_names_the_stored_exchange_and_rate_counts_and_stores(tiny_model, make_settings):
    settings = make_settings()
    async with ReplyEngine(tiny_model, open_store("memory://", max_turns=3), settings) as engine:
        reply = await engine.respond("c", "hello there", user="u", platform="slack")
        [exchange] = await engine.history("c")
        assert reply.exchange == ExchangeRef("c", exchange.id) and reply.at == exchange.at
        assert await engine.rate(reply.exchange, "bad", user="U2", platform="slack")
        assert counted(engine, "slack", "bad") == 1 and counted(engine, "slack", "good") == 0
        [row] = await engine.store.list_feedback()
        assert (row.exchange, row.rating, row.user, row.platform) == (reply.exchange, "bad", "U2", "slack")
        with pytest.raises(ValueError):
            await engine.rate(reply.exchange, "meh", user="U2", platform="slack")
        # A deflected message is not stored, so there is nothing to rate.
        deflected = await engine.respond("c", "you are a fucking idiot", user="u", platform="slack")
        assert deflected.text == settings.safety_deflection and deflected.exchange is None and deflected.at is None


async def test_blocked_users_ratings_are_neither_stored_nor_counted(tiny_model, make_settings):
    settings = make_settings(blocked_users=frozenset({"U9"}))
    async with ReplyEngine(tiny_model, open_store("memory://", max_turns=3), settings) as engine:
        reply = await engine.respond("c", "hello", user="u", platform="slack")
        assert not await engine.rate(reply.exchange, "bad", user="U9", platform="slack")
        assert counted(engine, "slack", "bad") == 0
        assert await engine.store.list_feedback() == []


async def test_web_reply_can_be_rated_and_the_operator_sees_counts_and_recent_web_exchanges(client):
    first = await chat(client, "alpha", "what's your favourite colour?", user="alice")
    second = await chat(client, "alpha", "and your favourite food?", user="alice")
    other = await chat(client, "beta", "tell me a joke")
    assert isinstance(first["exchange_id"], str) and isinstance(first["at"], float)
    assert first["exchange_id"] != second["exchange_id"]
    for body in ({"conversation": "alpha", "exchange_id": first["exchange_id"], "rating": "good", "user": "alice"},
                 {"conversation": "alpha", "exchange_id": second["exchange_id"], "rating": "bad", "user": "alice"},
                 {"conversation": "beta", "exchange_id": other["exchange_id"], "rating": "bad"}):
        response = await client.post("/api/feedback", json=body)
        assert (response.status, await response.json()) == (200, {"recorded": True})
    # A rating from Slack is counted but its text is not shown.
    engine = client.server.app[STATE].engine
    slack = await engine.respond("slack:T1:D1", "a private slack message", user="U2", platform="slack")
    await engine.rate(slack.exchange, "good", user="U2", platform="slack")

    response = await client.get("/api/feedback", params={"recent": "2"})
    assert response.status == 200
    report = await response.json()
    assert report["counts"] == {"web": {"good": 1, "bad": 2}, "slack": {"good": 1, "bad": 0}}
    assert report["total"] == 4 and report["bad_share"] == 0.5
    # The rater is the caller (here its address), not the `user` it says it is.
    assert [(r["conversation"], r["rating"], r["user"]) for r in report["recent"]] == [
        ("beta", "bad", "web-caller:127.0.0.1"), ("alpha", "bad", "web-caller:127.0.0.1")]
    assert report["recent"][1]["exchange_id"] == second["exchange_id"]
    assert report["recent"][1]["exchange"]["user"] == "and your favourite food?"
    assert report["recent"][1]["exchange"]["bot"] == second["reply"]
    assert report["recent"][1]["exchange"]["at"] == second["at"]
    assert "a private slack message" not in await response.text()
    assert counted(engine, "web", "bad") == 2 and counted(engine, "web", "good") == 1


async def test_rating_again_replaces_the_earlier_rating(client):
    reply = await chat(client, "c", "hello", user="alice")
    for rating in ("bad", "good"):
        body = {"conversation": "c", "exchange_id": reply["exchange_id"], "rating": rating, "user": "alice"}
        assert (await client.post("/api/feedback", json=body)).status == 200
    report = await (await client.get("/api/feedback")).json()
    assert report["counts"] == {"web": {"good": 1, "bad": 0}}


async def test_feedback_window_counts_only_recent_ratings(client):
    engine = client.server.app[STATE].engine
    reply = await engine.respond("web:c", "hello", platform="web")
    await engine.rate(reply.exchange, "bad", user="web:c", platform="web")
    await asyncio.sleep(1.2)  # the window is measured on the wall clock
    report = await (await client.get("/api/feedback", params={"window": "1s"})).json()
    assert report["counts"] == {} and report["total"] == 0 and report["bad_share"] is None
    assert len(report["recent"]) == 1  # recent ratings are listed whatever the window
    assert (await (await client.get("/api/feedback", params={"window": "1h"})).json())["total"] == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"conversation": "c", "rating": "good"}, 400, "bad_request"),
        ({"conversation": "c", "exchange_id": 1.5, "rating": "good"}, 400, "bad_request"),
        ({"conversation": "c", "exchange_id": "has space", "rating": "good"}, 400, "bad_request"),
        ({"conversation": "c", "exchange_id": "", "rating": "good"}, 400, "bad_request"),
        ({"conversation": "c", "exchange_id": "ex", "rating": "meh"}, 400, "bad_request"),
        ({"conversation": "c", "exchange_id": "ex", "rating": "good", "user": "has space"}, 400, "bad_request"),
        ({"exchange_id": "ex", "rating": "good"}, 400, "bad_request"),
        ({"conversation": "c", "exchange_id": "no-such-exchange", "rating": "good"}, 404, "not_found"),
    ],
)
async def test_bad_ratings_get_a_clear_answer_and_store_nothing(client, body, status, code):
    await chat(client, "c", "hello")
    response = await client.post("/api/feedback", json=body)
    data = await response.json()
    assert (response.status, data["code"]) == (status, code)
    assert data["error"].strip()
    assert await client.server.app[STATE].engine.store.list_feedback() == []


@pytest.mark.parametrize("query", [{"window": "soon"}, {"recent": "-1"}, {"recent": "1000"}])
async def test_bad_feedback_queries_get_400(client, query):
    response = await client.get("/api/feedback", params=query)
    assert response.status == 400 and (await response.json())["code"] == "bad_request"


async def test_forgotten_conversation_takes_its_ratings_with_it(client):
    reply = await chat(client, "c", "hello")
    assert (await client.post("/api/feedback", json={"conversation": "c", "exchange_id": reply["exchange_id"],
                                                     "rating": "bad"})).status == 200
    assert (await client.post("/api/reset", json={"conversation": "c"})).status == 200
    report = await (await client.get("/api/feedback")).json()
    assert report["total"] == 0 and report["recent"] == []
    again = await client.post("/api/feedback", json={"conversation": "c", "exchange_id": reply["exchange_id"],
                                                     "rating": "bad"})
    assert again.status == 404


async def test_feedback_endpoints_need_the_token_like_the_rest_of_the_api(serve):
    client = await serve(http_host="0.0.0.0", web_api_token="tok")
    auth = {"Authorization": "Bearer tok"}
    assert (await client.get("/api/feedback")).status == 401
    assert (await client.post("/api/feedback", json={"conversation": "c", "exchange_id": "ex",
                                                     "rating": "good"})).status == 401
    assert (await client.get("/api/feedback", headers=auth)).status == 200
    reply = await (await client.post("/api/chat", json={"conversation": "c", "text": "hi"}, headers=auth)).json()
    body = {"conversation": "c", "exchange_id": reply["exchange_id"], "rating": "good"}
    # The web API's rules hold here too: JSON only (a cross-site form cannot send it), and no other site's page.
    as_text = await client.post("/api/feedback", data=json.dumps(body), headers={**auth, "Content-Type": "text/plain"})
    assert (as_text.status, (await as_text.json())["code"]) == (415, "unsupported_media_type")
    cross_site = await client.post("/api/feedback", json=body, headers={**auth, "Origin": "https://evil.example"})
    assert (cross_site.status, (await cross_site.json())["code"]) == (403, "cross_origin")
    assert await client.server.app[STATE].engine.store.list_feedback() == []
    assert (await client.post("/api/feedback", json=body, headers=auth)).status == 200


def test_terminal_good_and_bad_rate_the_previous_reply(tmp_path, blenderbot_dir):
    env = subprocess_env(
        BLENDERBOT_MODEL=str(blenderbot_dir), BLENDERBOT_MAX_NEW_TOKENS="6", BLENDERBOT_NUM_BEAMS="1",
        MEMORY_URL=f"sqlite:///{tmp_path}/memory.db", LOG_LEVEL="WARNING",
    )

    def run(stdin: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-m", "bot", "chat", "--conversation", "mine"],
            input=stdin, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        # What the bot says in this session: after the help line (a resumed conversation is shown before it).
        session = result.stdout.split(HELP, 1)[1]
        return [line.split("bot> ", 1)[1] for line in session.splitlines() if "bot> " in line]

    assert run("/good\n") == ["(no reply to rate yet)"]
    answers = run("Hello bot!\nHow are you?\n/bad\n/quit\n")
    assert answers[2] == "(thanks: last reply rated bad)"
    assert run("/good\n") == ["(thanks: last reply rated good)"]  # resumed: the last reply remembered
    with sqlite3.connect(tmp_path / "memory.db") as db:
        rows = db.execute("SELECT f.rating, f.platform, e.user_text FROM feedback f JOIN exchanges e "
                          "ON e.conversation = f.conversation AND e.exchange_id = f.exchange_id").fetchall()
    assert rows == [("good", "terminal", "How are you?")]  # the same user rated it again
    assert run("/reset\n/bad\n") == ["(conversation forgotten)", "(no reply to rate yet)"]


# -- the web API's ratings: one per reply and caller, limited like chat, counted only when stored ---------------


@pytest.fixture(params=["sqlite", "redis"])
def memory_url(request, tmp_path) -> str:
    """Each store keeps ratings its own way: a SQLite table, a Redis hash per conversation."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/memory.db"
        return
    url = request.getfixturevalue("redis_url")
    prefix = unique_prefix()
    yield f"{url}?prefix={prefix}"
    delete_prefix(url, prefix)


async def counted_over_http(client: TestClient, platform: str, rating: str) -> float:
    """`blenderchat_feedback_total{platform, rating}` as a scraper reads it from /metrics."""
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "blenderchat_feedback_total" and sample.labels == {"platform": platform,
                                                                               "rating": rating}:
                return sample.value
    raise AssertionError(f"no blenderchat_feedback_total sample for {platform}/{rating}")


async def test_one_caller_rating_a_reply_under_many_user_names_keeps_one_rating(serve, memory_url):
    client = await serve(memory_url=memory_url, web_rate_limit_per_minute=0)  # the limit is tested below
    liked = await chat(client, "c", "hello there")
    rated = await chat(client, "c", "tell me more")
    good = {"conversation": "c", "exchange_id": liked["exchange_id"], "rating": "good", "user": "alice"}
    assert (await client.post("/api/feedback", json=good)).status == 200
    # `user` is whatever the caller says: 30 names from one caller are still one rater.
    for rating, names in (("good", range(10)), ("bad", range(10, 30))):
        for name in names:
            body = {"conversation": "c", "exchange_id": rated["exchange_id"], "rating": rating, "user": f"u{name}"}
            response = await client.post("/api/feedback", json=body)
            assert (response.status, await response.json()) == (200, {"recorded": True})
    report = await (await client.get("/api/feedback")).json()
    assert report["counts"] == {"web": {"good": 1, "bad": 1}}  # the last rating replaced the caller's earlier ones
    assert report["total"] == 2 and report["bad_share"] == 0.5
    assert [(r["exchange_id"], r["rating"]) for r in report["recent"]] == [
        (rated["exchange_id"], "bad"), (liked["exchange_id"], "good")]


async def test_ratings_take_the_callers_limit_like_chat_messages(serve, memory_url):
    client = await serve(memory_url=memory_url, web_rate_limit_per_minute=3)  # 3 at once, then one each 20 s
    reply = await chat(client, "c", "hello there")
    for name in ("a", "b"):
        body = {"conversation": "c", "exchange_id": reply["exchange_id"], "rating": "bad", "user": name}
        assert (await client.post("/api/feedback", json=body)).status == 200
    # The caller's three are spent, whatever `user` each request names.
    refused = await client.post("/api/feedback", json={**body, "rating": "good", "user": "c"})
    data = await refused.json()
    assert (refused.status, data["code"]) == (429, "rate_limited") and data["error"].strip()
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await client.post("/api/chat", json={"conversation": "c", "text": "hi"})).status == 429
    report = await (await client.get("/api/feedback")).json()
    assert report["counts"] == {"web": {"good": 0, "bad": 1}}  # the refused "good" was not stored
    assert await counted_over_http(client, "web", "good") == 0


async def test_only_stored_ratings_are_counted_in_the_metrics(serve, memory_url):
    client = await serve(memory_url=memory_url, web_rate_limit_per_minute=0)
    reply = await chat(client, "c", "hello there")
    for exchange_id in (f"no-such-exchange-{i}" for i in range(20)):
        response = await client.post("/api/feedback", json={"conversation": "c", "exchange_id": exchange_id,
                                                            "rating": "bad"})  # fmt: skip
        assert response.status == 404
    assert await counted_over_http(client, "web", "bad") == 0
    body = {"conversation": "c", "exchange_id": reply["exchange_id"], "rating": "bad"}
    assert (await client.post("/api/feedback", json=body)).status == 200
    assert await counted_over_http(client, "web", "bad") == 1
    # A forgotten reply can no longer be rated, and is not counted either.
    assert (await client.post("/api/reset", json={"conversation": "c"})).status == 200
    assert (await client.post("/api/feedback", json=body)).status == 404
    assert await counted_over_http(client, "web", "bad") == 1
