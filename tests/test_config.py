"""Settings: defaults, parsing, and one clear line for every bad value."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest
from conftest import subprocess_env

from bot.config import ConfigError, load_settings


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings({})
    assert settings.model == "facebook/blenderbot-400M-distill"
    assert settings.device == "auto" and settings.quantize == "auto"
    assert settings.num_beams is None and settings.max_new_tokens is None
    assert settings.memory_url == "sqlite:///data/memory.db"
    assert settings.http_host == "127.0.0.1" and settings.http_port == 8080
    assert settings.memory_ttl == 30 * 86400
    assert settings.shutdown_grace < 10  # below Docker's stop grace period


def test_values_are_parsed(tmp_path):
    settings = load_settings(
        {
            "BLENDERBOT_MODEL": str(tmp_path),
            "BLENDERBOT_DEVICE": "CPU",
            "BLENDERBOT_NUM_BEAMS": "4",
            "BLENDERBOT_MAX_NEW_TOKENS": "40",
            "MEMORY_URL": "memory://",
            "MEMORY_TTL": "12h",
            "LOG_LEVEL": "debug",
            "DISCORD_GUILD_IDS": "123, 456",
            "DISCORD_DMS": "off",
            "SLACK_BOT_TOKEN": "xoxb-1",
            "SLACK_APP_TOKEN": "xapp-1",
        }
    )
    assert settings.model == str(tmp_path) and settings.device == "cpu"
    assert settings.num_beams == 4 and settings.max_new_tokens == 40
    assert settings.memory_ttl == 12 * 3600 and settings.log_level == "DEBUG"
    assert settings.discord_guild_ids == {"123", "456"} and settings.discord_dms is False


def test_data_dir_moves_the_default_database(tmp_path):
    assert load_settings({"DATA_DIR": str(tmp_path)}).memory_url == f"sqlite:///{tmp_path}/memory.db"


A_FILE = "/etc/hostname"

BAD_VALUES = [
    ("BLENDERBOT_DEVICE", "tpu", "use one of auto, cpu, cuda"),
    ("BLENDERBOT_NUM_BEAMS", "ten", "a whole number >= 1"),
    ("BLENDERBOT_NUM_BEAMS", "0", "a whole number >= 1"),
    ("BLENDERBOT_MIN_NEW_TOKENS", "-1", "a whole number >= 0"),
    ("BLENDERBOT_MAX_NEW_TOKENS", "1.5", "a whole number >= 1"),
    ("BLENDERBOT_QUANTIZE", "int4", "use one of auto, int8, none"),
    ("BLENDERBOT_DTYPE", "fp8", "use one of auto, float32, float16, bfloat16"),
    ("BLENDERBOT_THREADS", "many", "a whole number >= 1"),
    ("BLENDERBOT_RUNTIME", "onnx", "use one of auto, ctranslate2, transformers"),
    ("BLENDERBOT_CT2_DIR", A_FILE, "it is a file; use a directory"),
    ("BLENDERBOT_MODEL", "/no/such/model/dir", "that model directory does not exist"),
    ("BLENDERBOT_MODEL", "./missing-model", "that model directory does not exist"),
    ("BLENDERBOT_MODEL", "not a model id!", "hub id"),
    ("MEMORY_URL", "postgres://db/memory", "use sqlite:///path/to/file.db, memory:// or redis://"),
    ("MEMORY_URL", f"sqlite:///{A_FILE}/memory.db", "cannot create the database"),
    ("MEMORY_URL", "sqlite:////tmp", "the path is a directory"),
    ("MEMORY_MAX_TURNS", "0", "a whole number >= 1"),
    ("MEMORY_TTL", "a month", "a duration such as 90s, 15m, 12h or 30d"),
    ("LOG_LEVEL", "loud", "use one of DEBUG, INFO, WARNING, ERROR"),
    ("HTTP_PORT", "70000", "a whole number from 0 to 65535"),
    ("REPLY_TIMEOUT", "0", "a duration"),
    ("DISCORD_DMS", "maybe", "use on or off"),
    ("DISCORD_GUILD_IDS", "abc", "numeric ids separated by commas"),
    ("DISCORD_API_URL", "discord.com/api", "use a URL starting with http:// or https://"),
    ("DISCORD_GATEWAY_URL", "https://gateway", "use a URL starting with ws:// or wss://"),
    ("SAFETY_BLOCKLIST", "/no/such/blocklist.txt", "use the path of a readable text file"),
    ("RATE_LIMIT_PER_MINUTE", "fast", "a number >= 0"),
]


@pytest.mark.parametrize("variable, value, allowed", BAD_VALUES)
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(variable, value, allowed):
    with pytest.raises(ConfigError) as error:
        load_settings({variable: value})
    message = str(error.value)
    assert message.startswith(f"{variable}={value!r} is not valid: ")
    assert allowed in message
    assert "\n" not in message


def test_combinations_are_checked():
    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET.*SLACK_APP_TOKEN"):
        load_settings({"SLACK_BOT_TOKEN": "xoxb-1"})
    with pytest.raises(ConfigError, match="xapp-"):
        load_settings({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xoxb-wrong"})
    with pytest.raises(ConfigError, match="DISCORD_SHARD_COUNT"):
        load_settings({"DISCORD_SHARD_IDS": "0,1"})
    with pytest.raises(ConfigError, match="below DISCORD_SHARD_COUNT"):
        load_settings({"DISCORD_SHARD_IDS": "0,2", "DISCORD_SHARD_COUNT": "2"})


def test_secret_values_are_never_shown():
    with pytest.raises(ConfigError) as error:
        load_settings({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xoxb-super-secret"})
    assert "super-secret" not in str(error.value) and "<hidden>" in str(error.value)


@pytest.mark.parametrize("variable, value", [("BLENDERBOT_DEVICE", "tpu"), ("MEMORY_URL", "mysql://x")])
def test_the_cli_prints_one_line_and_exits_2(tmp_path, variable, value):
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat"],
        env=subprocess_env(**{variable: value}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and value in lines[0]
    assert "Traceback" not in result.stderr


def test_a_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("BLENDERBOT_DEVICE=gpu-please\n")
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat"], env=subprocess_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2 and "BLENDERBOT_DEVICE='gpu-please'" in result.stderr


def test_env_example_lists_every_setting_and_loads_cleanly(tmp_path):
    import inspect
    import re

    from dotenv import dotenv_values

    import bot.config

    read = set(re.findall(r'env\.\w+\(\s*"([A-Z0-9_]+)"', inspect.getsource(bot.config.load_settings)))
    example = dotenv_values(Path(bot.config.__file__).parent.parent / ".env.example")
    assert read == set(example)
    values = {k: v for k, v in example.items() if v and k != "BLENDERBOT_MODEL"}
    load_settings(values)  # the example's values are all valid
