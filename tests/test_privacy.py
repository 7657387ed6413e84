"""Privacy: idle conversations deleted after MEMORY_TTL, forgetting on request,
and no secrets in logs or configuration errors."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import time

import pytest
from conftest import subprocess_env
from model_doubles import GatedModel

from bot.config import ConfigError, load_settings
from bot.engine import ReplyEngine
from bot.memory import StoreUnavailable, open_store
from bot.memory.inprocess import InProcessStore
from bot.redact import REDACTED, SecretRedactor, redact
from bot.safety import SafetyFilter

SLACK_BOT_TOKEN = "xoxb-1111111111-2222222222-AbCdEfGhIjKlMnOpQrStUvWx"
SLACK_APP_TOKEN = "xapp-1-A0123456789-1234567890123-abcdef0123456789abcdef0123456789"
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
WEB_TOKEN = "web-api-token-do-not-print"


@pytest.fixture(params=["sqlite", "memory"])
def memory_url(request, tmp_path) -> str:
    return f"sqlite:///{tmp_path}/memory.db" if request.param == "sqlite" else "memory://"


async def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- MEMORY_TTL ------------------------------------------------------------------


async def test_sweep_at_start_deletes_idle_conversations_and_keeps_active_ones(tiny_model, make_settings, memory_url):
    settings = make_settings(memory_url=memory_url, memory_ttl=3.0)
    safety = SafetyFilter.from_settings(settings)  # loaded now, so the engine starts at once
    store = open_store(memory_url, max_turns=settings.memory_max_turns)
    await store.open()
    await store.append_exchange("idle", "hello", "hi")
    await asyncio.sleep(3.2)  # "idle" is now older than MEMORY_TTL
    await store.append_exchange("active", "hello", "hi")
    if memory_url != "memory://":  # a real restart: a new store on the same file
        await store.close()
        store = open_store(memory_url, max_turns=settings.memory_max_turns)

    async with ReplyEngine(GatedModel(tiny_model), store, settings, safety=safety) as engine:
        await wait_until(lambda: _is_gone(engine, "idle"))
        assert [e.user for e in await engine.history("active")] == ["hello"]


async def test_the_periodic_sweep_deletes_a_conversation_once_idle(tiny_model, make_settings, memory_url):
    settings = make_settings(memory_url=memory_url, memory_ttl=2.0)
    store = open_store(memory_url, max_turns=settings.memory_max_turns)
    async with ReplyEngine(GatedModel(tiny_model), store, settings) as engine:
        await engine.reply("left", "bye")
        await engine.reply("chatty", "hello")

        async def left_is_gone_while_chatty_talks() -> bool:
            await engine.reply("chatty", "still here")
            return await _is_gone(engine, "left")

        await wait_until(left_is_gone_while_chatty_talks)
        assert len(await engine.history("chatty")) >= 2


async def test_zero_ttl_keeps_conversations_forever(tiny_model, make_settings, memory_url):
    settings = make_settings(memory_url=memory_url, memory_ttl=0.0)
    store = open_store(memory_url, max_turns=settings.memory_max_turns)
    async with ReplyEngine(GatedModel(tiny_model), store, settings) as engine:
        await engine.reply("c", "remember me")
        await asyncio.sleep(0.5)  # a sweep with 0 s would delete everything idle at all
        assert len(await engine.history("c")) == 1


class FailingSweepStore(InProcessStore):
    """The in-process store whose first sweep fails, as a database outage would."""

    def __init__(self) -> None:
        super().__init__(max_turns=20)
        self.sweeps = 0

    async def sweep(self, idle_seconds: float) -> int:
        self.sweeps += 1
        if self.sweeps == 1:
            raise StoreUnavailable("database is locked")
        return await super().sweep(idle_seconds)


async def test_a_failing_sweep_is_logged_and_counted_and_the_next_one_runs(tiny_model, make_settings, caplog):
    settings = make_settings(memory_ttl=1.0)
    store = FailingSweepStore()
    async with ReplyEngine(GatedModel(tiny_model), store, settings) as engine:
        await engine.reply("c", "hello")
        await wait_until(lambda: _is_gone(engine, "c"))
        assert engine.metrics.registry.get_sample_value("blenderchat_errors_total", {"kind": "memory_sweep"}) == 1
        assert await engine.reply("c2", "hello")  # still serving
    assert any("Could not sweep idle conversations" in r.getMessage() for r in caplog.records)


async def test_reset_forgets_a_conversation(tiny_model, make_settings, memory_url):
    settings = make_settings(memory_url=memory_url)
    async with ReplyEngine(GatedModel(tiny_model), open_store(memory_url, max_turns=20), settings) as engine:
        await engine.reply("c", "my secret is 42")
        assert await engine.reset("c") is True
        assert await engine.history("c") == []
        assert await engine.reset("c") is False


async def _is_gone(engine: ReplyEngine, conversation: str) -> bool:
    return await engine.history(conversation) == []


# -- secrets in logs -----------------------------------------------------------


@pytest.mark.parametrize(
    "line,secret",
    [
        (f"connecting with {SLACK_BOT_TOKEN}", SLACK_BOT_TOKEN),
        (f"socket mode token={SLACK_APP_TOKEN}", SLACK_APP_TOKEN),
        (f"gateway login {DISCORD_TOKEN}", DISCORD_TOKEN),
        ("headers {'Authorization': 'Bot abcdefghijklmnopqrstuvwxyz.123'}", "abcdefghijklmnopqrstuvwxyz.123"),
        ("Authorization: Bearer 0123456789abcdef0123456789", "0123456789abcdef0123456789"),
        ("redis connection to redis://:hunter2pass@redis.internal:6379/0 lost", "hunter2pass"),
    ],
)
def test_token_shaped_text_is_redacted(line, secret):
    cleaned = redact(line)
    assert secret not in cleaned and REDACTED in cleaned


def test_ordinary_text_is_left_alone():
    line = "Bot ready in 3 channels; conversation slack:T1:C2:1700000000.000100 answered in 0.8s"
    assert redact(line, ["not-in-the-line"]) == line


def test_the_log_filter_redacts_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretRedactor([SIGNING_SECRET, WEB_TOKEN]))
    parent = logging.getLogger("redaction-test")
    parent.addHandler(handler)
    parent.propagate = False
    child = logging.getLogger("redaction-test.adapter")  # records of children reach the handler too
    try:
        child.warning("signing secret %s and web token %s", SIGNING_SECRET, WEB_TOKEN)
        try:
            raise RuntimeError(f"auth failed for {SLACK_BOT_TOKEN}")
        except RuntimeError:
            child.exception("could not connect with %s", DISCORD_TOKEN)
    finally:
        parent.removeHandler(handler)
    output = stream.getvalue()
    for secret in (SIGNING_SECRET, WEB_TOKEN, SLACK_BOT_TOKEN, DISCORD_TOKEN):
        assert secret not in output
    assert output.count(REDACTED) == 4 and "RuntimeError: auth failed for" in output


def test_the_cli_logging_setup_redacts_secret_settings():
    code = (
        "import logging\n"
        "from bot.cli import setup_logging\n"
        "from bot.config import load_settings\n"
        "from bot.redact import secret_values\n"
        "settings = load_settings()\n"
        "setup_logging(settings.log_level, secret_values(settings))\n"
        "log = logging.getLogger('bot.adapters')\n"
        "log.info('tokens %s %s %s', settings.web_api_token, settings.slack_signing_secret, settings.discord_token)\n"
        "try:\n"
        "    raise ValueError('bad ' + settings.slack_bot_token)\n"
        "except ValueError:\n"
        "    log.exception('failed')\n"
    )
    env = subprocess_env(
        WEB_API_TOKEN=WEB_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_BOT_TOKEN="xoxb-custom-bot-token-value",
        DISCORD_TOKEN="plain-discord-secret",
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for secret in (WEB_TOKEN, SIGNING_SECRET, "xoxb-custom-bot-token-value", "plain-discord-secret"):
        assert secret not in result.stderr
    assert "tokens <redacted> <redacted> <redacted>" in result.stderr and "ValueError: bad <redacted>" in result.stderr


def test_hugging_face_retry_warnings_are_logged_once_and_redacted():
    """The hub library's own handler printed each retry warning bare, beside our copy, and unredacted."""
    code = (
        "import socket\n"
        "from bot.cli import setup_logging\n"
        "setup_logging('INFO', ['hub-secret-value'])\n"
        "import transformers\n"
        "from huggingface_hub.utils import http_backoff\n"
        "with socket.socket() as closed:\n"
        "    closed.bind(('127.0.0.1', 0))\n"
        "    url = 'http://127.0.0.1:%d/hub-secret-value' % closed.getsockname()[1]\n"
        "try:\n"
        "    http_backoff('GET', url, max_retries=1, base_wait_time=0.01)\n"
        "except Exception:\n"
        "    pass\n"
    )
    env = subprocess_env(HF_HUB_OFFLINE="0")  # the request goes to a closed port on this machine
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    retries = [line for line in result.stderr.splitlines() if "Retrying in" in line]
    assert len(retries) == 1 and " WARNING huggingface_hub" in retries[0], result.stderr
    assert "hub-secret-value" not in result.stderr and REDACTED in result.stderr


# -- secrets in configuration errors ----------------------------------------------


def test_a_bad_secret_setting_is_named_but_its_value_hidden():
    with pytest.raises(ConfigError) as raised:
        load_settings({"SLACK_APP_TOKEN": SLACK_BOT_TOKEN}, dotenv=False)
    assert "SLACK_APP_TOKEN" in str(raised.value) and SLACK_BOT_TOKEN not in str(raised.value)


def test_the_cli_hides_secrets_in_configuration_errors():
    for bad, secret in (
        ({"SLACK_APP_TOKEN": SLACK_BOT_TOKEN}, SLACK_BOT_TOKEN),
        ({"DISCORD_API_URL": DISCORD_TOKEN}, DISCORD_TOKEN),  # a token pasted into the wrong variable
    ):
        result = subprocess.run(
            [sys.executable, "-m", "bot", "chat"], env=subprocess_env(**bad), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2
        assert next(iter(bad)) in result.stderr and secret not in result.stderr


async def test_forgotten_and_expired_text_is_gone_from_the_sqlite_file(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/memory.db", max_turns=20)
    await store.open()
    for i in range(20):
        await store.append_exchange(f"keep{i}", "hello " * 50, "hi " * 50)
    await store.append_exchange("forget me", "my password is Zebra-4471 " * 10, "ok")
    await store.append_exchange("expire me", "my address is Okapi-9911 " * 10, "ok")
    await asyncio.sleep(0.2)
    await store.append_exchange("recent", "hello", "hi")
    assert await store.reset("forget me")
    assert await store.sweep(0.1) == 21  # all but "recent" (and the one already forgotten)
    await store.close()
    data = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert b"Zebra-4471" not in data and b"Okapi-9911" not in data
