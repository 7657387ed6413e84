"""`blender-chat run` as a real process: start-up, the web API over HTTP,
metrics, concurrency, graceful shutdown, the non-loopback lock, start-up errors."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from bot_process import BotProcess, http, metric, port_env, run_once
from tiny_models import build_blenderbot

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def bot(blenderbot_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("run")
    process = BotProcess(
        tmp / "bot.log",
        BLENDERBOT_MODEL=str(blenderbot_dir),
        BLENDERBOT_MAX_NEW_TOKENS="8",
        BLENDERBOT_NUM_BEAMS="1",
        MEMORY_URL=f"sqlite:///{tmp / 'memory.db'}",
        **port_env(),
    )
    process.model, process.memory_db = blenderbot_dir, (tmp / "memory.db").resolve()
    try:
        process.wait_ready()
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that one reply of 300 tokens takes about a second or more."""
    return build_blenderbot(
        tmp_path_factory.mktemp("slow-blenderbot"), max_positions=512, d_model=256, decoder_layers=6, ffn_dim=1024
    )


def slow_env(model: Path, db: Path, **extra: str) -> dict[str, str]:
    env = dict(
        BLENDERBOT_MODEL=str(model),
        BLENDERBOT_MIN_NEW_TOKENS="300",
        BLENDERBOT_MAX_NEW_TOKENS="300",
        BLENDERBOT_NUM_BEAMS="1",
        MEMORY_URL=f"sqlite:///{db}",
        **port_env(),
    )
    env.update(extra)
    return env


def test_ready_health_and_startup_log(bot: BotProcess) -> None:
    status, _, body = http("GET", bot.base + "/readyz")
    assert (status, body["ready"], body["adapters"]) == (200, True, [])
    status, _, body = http("GET", bot.base + "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    log = bot.log
    assert f"only the web chat runs, at {bot.base}/" in log and "DISCORD_TOKEN" in log and "SLACK_BOT_TOKEN" in log
    # What start-up says, in order: what it loads, that it is loaded, where conversations are kept.
    loading, ready, memory = (log.find(text) for text in ("Loading ", "Model ready in", "Conversations are kept"))
    assert -1 < loading < ready < memory, log
    assert f"Loading {bot.model} ..." in log
    assert f"Conversations are kept in the SQLite file {bot.memory_db}" in log


def test_chat_answers_remembers_and_resets(bot: BotProcess) -> None:
    texts = ["hello there", "do you have any pets?", "what is your favourite food?"]
    replies = []
    for text in texts:
        status, _, body = http("POST", bot.base + "/api/chat", {"conversation": "remember-me", "text": text})
        assert status == 200, body
        assert isinstance(body["reply"], str) and body["reply"].strip()
        replies.append(body["reply"])

    status, _, body = http("GET", bot.base + "/api/history?conversation=remember-me")
    assert status == 200
    assert [(e["user"], e["bot"]) for e in body["exchanges"]] == list(zip(texts, replies))
    _, _, other = http("GET", bot.base + "/api/history?conversation=someone-else")
    assert other["exchanges"] == []

    status, _, body = http("POST", bot.base + "/api/reset", {"conversation": "remember-me"})
    assert (status, body) == (200, {"reset": True})
    _, _, body = http("GET", bot.base + "/api/history?conversation=remember-me")
    assert body["exchanges"] == []


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "bad_request"),
        (b'{"text": "hi"}', 400, "bad_request"),
        (b'{"conversation": "c", "text": 5}', 400, "bad_request"),
        (b'{"conversation": "c", "text": "   "}', 400, "empty"),
        (b'{"conversation": "c", "text": "' + b"x" * 2001 + b'"}', 413, "too_long"),
    ],
)
def test_malformed_requests_get_4xx_json(bot: BotProcess, raw: bytes, status: int, code: str) -> None:
    got, headers, body = http("POST", bot.base + "/api/chat", raw=raw, headers={"Content-Type": "application/json"})
    assert (got, body["code"]) == (status, code)
    assert body["error"] and "Traceback" not in body["error"]


def test_metrics_counters_move(bot: BotProcess) -> None:
    status, headers, _ = http("GET", bot.base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    before = {
        "ok": metric(bot.base, "blenderchat_replies_total", platform="web", outcome="ok"),
        "empty": metric(bot.base, "blenderchat_replies_total", platform="web", outcome="empty"),
        "tokens": metric(bot.base, "blenderchat_generated_tokens_total"),
        "latency": metric(bot.base, "blenderchat_reply_latency_seconds_count", platform="web"),
        "batches": metric(bot.base, "blenderchat_batch_size_count"),
    }
    assert http("POST", bot.base + "/api/chat", {"conversation": "metrics", "text": "hello"})[0] == 200
    assert http("POST", bot.base + "/api/chat", {"conversation": "metrics", "text": ""})[0] == 400
    assert metric(bot.base, "blenderchat_replies_total", platform="web", outcome="ok") == before["ok"] + 1
    assert metric(bot.base, "blenderchat_replies_total", platform="web", outcome="empty") == before["empty"] + 1
    assert metric(bot.base, "blenderchat_generated_tokens_total") > before["tokens"]
    assert metric(bot.base, "blenderchat_reply_latency_seconds_count", platform="web") == before["latency"] + 1
    assert metric(bot.base, "blenderchat_batch_size_count") > before["batches"]
    assert metric(bot.base, "blenderchat_queue_depth") == 0


async def test_twenty_concurrent_chats_over_five_conversations(bot: BotProcess) -> None:
    conversations = [f"crowd-{i}" for i in range(5)]
    burst = [(c, f"burst {n} in {c}") for n in range(4) for c in conversations]
    async with aiohttp.ClientSession() as session:

        async def chat(conversation: str, text: str) -> str:
            async with session.post(bot.base + "/api/chat", json={"conversation": conversation, "text": text}) as r:
                body = await r.json()
                assert r.status == 200 and body["reply"].strip(), body
                return body["reply"]

        async def one_after_another(conversation: str) -> list[tuple[str, str]]:
            texts = [f"turn {n} in {conversation}" for n in range(4)]
            return [(text, await chat(conversation, text)) for text in texts]

        # All 20 at once: the order inside a conversation is whichever reached the server first.
        burst_replies = await asyncio.gather(*(chat(c, t) for c, t in burst))
        reply_to = {text: reply for (_, text), reply in zip(burst, burst_replies)}
        # Then the five conversations side by side, each sending its next message once answered.
        in_order = await asyncio.gather(*(one_after_another(c) for c in conversations))

        for conversation, sent in zip(conversations, in_order):
            async with session.get(bot.base + "/api/history", params={"conversation": conversation}) as r:
                exchanges = [(e["user"], e["bot"]) for e in (await r.json())["exchanges"]]
            # Every message stored once, with the reply its sender got; sequential ones in sending order.
            assert len(exchanges) == 8
            assert sorted(exchanges[:4]) == sorted((t, reply_to[t]) for c, t in burst if c == conversation)
            assert exchanges[4:] == sent


async def test_sigterm_finishes_replies_in_flight_and_refuses_new_ones(slow_model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "memory.db"
    bot = BotProcess(tmp_path / "bot.log", **slow_env(slow_model_dir, db))
    try:
        await asyncio.to_thread(bot.wait_ready)
        async with aiohttp.ClientSession() as session:

            async def chat(conversation: str, text: str) -> tuple[int, dict]:
                async with session.post(
                    bot.base + "/api/chat", json={"conversation": conversation, "text": text}
                ) as response:
                    return response.status, await response.json()

            # Two messages of one conversation: the second waits for the first, so both are in flight a while.
            in_flight = [asyncio.create_task(chat("slow", "hello there")), asyncio.create_task(chat("slow", "and?"))]
            deadline = time.monotonic() + 30
            while metric(bot.base, "blenderchat_queue_depth") < 2:
                assert time.monotonic() < deadline, "the replies never reached the engine"
                await asyncio.sleep(0.05)
            bot.signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            status, body = await chat("late", "are you there?")
            assert status == 503 and body["code"] == "closed"

            answers = await asyncio.gather(*in_flight)
            assert [status for status, _ in answers] == [200, 200]
            replies = [body["reply"] for _, body in answers]
        status = await asyncio.to_thread(bot.wait, 20)
        assert status == 0, bot.log
        assert time.monotonic() - signalled < 8 + 5  # SHUTDOWN_GRACE plus closing
        assert "Traceback" not in bot.log
    finally:
        bot.close()
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT conversation, user_text FROM exchanges ORDER BY id").fetchall()
    assert rows == [("web:slow", "hello there"), ("web:slow", "and?")]
    assert all(reply.strip() for reply in replies)


async def test_second_signal_exits_at_once(slow_model_dir: Path, tmp_path: Path) -> None:
    bot = BotProcess(tmp_path / "bot.log", **slow_env(slow_model_dir, tmp_path / "m.db", SHUTDOWN_GRACE="60"))
    try:
        await asyncio.to_thread(bot.wait_ready)
        async with aiohttp.ClientSession() as session:
            # Several queued replies: a graceful stop would take many seconds.
            async def chat(text: str) -> None:
                async with session.post(bot.base + "/api/chat", json={"conversation": "q", "text": text}):
                    pass

            pending = [asyncio.create_task(chat(f"m{i}")) for i in range(6)]
            while metric(bot.base, "blenderchat_queue_depth") < 6:
                await asyncio.sleep(0.05)
            bot.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            bot.signal(signal.SIGINT)
            started = time.monotonic()
            status = await asyncio.to_thread(bot.wait, 10)
            assert status == 128 + signal.SIGINT
            assert time.monotonic() - started < 5
            assert "second SIGINT, exiting at once with status 130" in bot.log
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        bot.close()


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def test_non_loopback_bind_without_token_disables_the_api(blenderbot_dir: Path, tmp_path: Path) -> None:
    env = port_env() | {"HTTP_HOST": "0.0.0.0", "HTTP_PORT": str(free_port("0.0.0.0"))}
    bot = BotProcess(tmp_path / "bot.log", BLENDERBOT_MODEL=str(blenderbot_dir), MEMORY_URL="memory://", **env)
    try:
        bot.wait_ready()
        status, _, body = http("POST", bot.base + "/api/chat", {"conversation": "c", "text": "hi"})
        assert (status, body["code"]) == (403, "disabled") and "WEB_API_TOKEN" in body["error"]
        assert http("GET", bot.base + "/")[0] == 403
        assert http("GET", bot.base + "/healthz")[0] == 200
        assert http("GET", bot.base + "/metrics")[0] == 200
        assert "WEB_API_TOKEN is not set" in bot.log
        # The log agrees with itself: no "only the web chat runs" beside "the web chat is disabled".
        assert "only the web chat runs" not in bot.log
        assert "nothing can chat with the bot" in bot.log
        bot.signal(signal.SIGINT)
        assert bot.wait(20) == 0
    finally:
        bot.close()


def test_non_loopback_bind_with_token_needs_the_header(blenderbot_dir: Path, tmp_path: Path) -> None:
    token = "s3cret-token-for-tests"
    env = port_env() | {"HTTP_HOST": "0.0.0.0", "HTTP_PORT": str(free_port("0.0.0.0")), "WEB_API_TOKEN": token}
    bot = BotProcess(tmp_path / "bot.log", BLENDERBOT_MODEL=str(blenderbot_dir), MEMORY_URL="memory://", **env)
    try:
        bot.wait_ready()
        chat = {"conversation": "c", "text": "hi"}
        status, headers, body = http("POST", bot.base + "/api/chat", chat)
        assert (status, body["code"], headers["WWW-Authenticate"]) == (401, "unauthorized", "Bearer")
        wrong = {"Authorization": "Bearer not-the-token", "Content-Type": "application/json"}
        assert http("POST", bot.base + "/api/chat", chat, headers=wrong)[0] == 401
        right = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        status, _, body = http("POST", bot.base + "/api/chat", chat, headers=right)
        assert status == 200 and body["reply"].strip()
        assert http("GET", bot.base + "/api/history?conversation=c")[0] == 401
        assert len(http("GET", bot.base + "/api/history?conversation=c", headers=right)[2]["exchanges"]) == 1
        # The page is served (it holds no data) and asks for the token when the API says 401.
        status, _, page = http("GET", bot.base + "/")
        assert status == 200 and "token" in page.lower()
        assert token not in bot.log
        bot.signal(signal.SIGTERM)
        assert bot.wait(20) == 0
    finally:
        bot.close()


def test_a_busy_port_fails_at_once_before_the_model_loads(blenderbot_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = port_env() | {"HTTP_PORT": str(port)}
        result = run_once("run", BLENDERBOT_MODEL=str(blenderbot_dir), MEMORY_URL="memory://", **env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"blender-chat: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "set HTTP_HOST/HTTP_PORT to a free address"
    )
    assert "Loading" not in result.stderr and "Traceback" not in result.stderr  # the model was never loaded


def test_model_load_error_is_one_line_and_fails(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = run_once("run", BLENDERBOT_MODEL=str(empty), MEMORY_URL="memory://", **port_env())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"blender-chat: Could not load the model {empty}" in result.stderr


def test_adapter_that_cannot_start_is_fatal_without_traceback(blenderbot_dir: Path, tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    result = run_once(
        "run",
        timeout=90,
        BLENDERBOT_MODEL=str(blenderbot_dir),
        MEMORY_URL="memory://",
        DISCORD_TOKEN="not-a-real-token",
        DISCORD_API_URL=f"http://{closed}/api/v10",
        DISCORD_GATEWAY_URL=f"ws://{closed}",
        **port_env(),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("blender-chat: ")]
    assert len(ours) == 1 and "discord" in ours[0].lower(), result.stderr


def test_download_says_a_local_directory_needs_nothing(blenderbot_dir: Path) -> None:
    result = run_once("download", BLENDERBOT_MODEL=str(blenderbot_dir))
    assert result.returncode == 0, result.stderr
    assert f"BLENDERBOT_MODEL is the local directory {blenderbot_dir}: nothing to download." in result.stdout
