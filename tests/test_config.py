"""Settings: defaults, parsing, and one clear line for every bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    ("CONVERSATION_QUEUE_SIZE", "0", "a whole number >= 1"),
    ("WEB_ALLOWED_HOSTS", "https://bot.example.com", "use host names or addresses separated by commas"),
    ("WEB_RATE_LIMIT_PER_MINUTE", "-1", "a whole number >= 0"),
    ("WEB_QUEUE_PERCENT", "0", "a whole number from 1 to 100"),
]


@pytest.mark.parametrize("variable, value, allowed", BAD_VALUES)
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(variable, value, allowed):
    with pytest.raises(ConfigError) as error:
        load_settings({variable: value})
    message = str(error.value)
    assert message.startswith(f"{variable}={value!r} is not valid: ")
    assert allowed in message
    assert "\n" not in message


def test_a_missing_setting_is_called_missing_and_says_what_to_set():
    with pytest.raises(ConfigError) as error:
        load_settings({"SLACK_BOT_TOKEN": "xoxb-1"})
    assert str(error.value) == (
        "SLACK_SIGNING_SECRET is missing: SLACK_BOT_TOKEN is set, "
        "so set SLACK_SIGNING_SECRET (HTTP mode) or SLACK_APP_TOKEN (Socket Mode)"
    )
    with pytest.raises(ConfigError) as error:
        load_settings({"DISCORD_SHARD_IDS": "0,1"})
    assert str(error.value).startswith("DISCORD_SHARD_COUNT is missing: DISCORD_SHARD_IDS is set")


DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"  # the shape, not a real one


@pytest.mark.parametrize(
    "variable, value, why",
    [
        ("SLACK_BOT_TOKEN", "xapp-1-A0123-4567-abcdef", "that is an app-level token, for SLACK_APP_TOKEN"),
        ("SLACK_BOT_TOKEN", "xoxp-1234-5678-abcdef", "that is a user token"),
        ("SLACK_BOT_TOKEN", "8f742231b10e8888abcd99yyyzzz85a5", "use the Bot User OAuth Token (xoxb-…)"),
        ("SLACK_SIGNING_SECRET", "xoxb-1234-5678-abcdef", "that is a token; use Basic Information → Signing Secret"),
        ("DISCORD_TOKEN", "Bot " + DISCORD_TOKEN, "leave out the 'Bot ' in front"),
        ("DISCORD_TOKEN", "1234567890123456789", "that looks like the Application ID"),
        ("DISCORD_TOKEN", "0123456789abcdef" * 4, "that looks like the Public Key"),
        ("DISCORD_TOKEN", "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1x-", "that looks like the OAuth2 Client Secret"),
        ("DISCORD_TOKEN", "xoxb-1234-5678-abcdef", "that looks like a Slack token"),
    ],
)
def test_a_credential_of_the_wrong_shape_is_refused_before_anything_starts(variable, value, why):
    env = {"SLACK_SIGNING_SECRET": "a-signing-secret"} if variable == "SLACK_BOT_TOKEN" else {}
    if variable == "SLACK_SIGNING_SECRET":
        env["SLACK_BOT_TOKEN"] = "xoxb-1"
    with pytest.raises(ConfigError) as error:
        load_settings(env | {variable: value})
    message = str(error.value)
    assert message.startswith(f"{variable}=<hidden> is not valid: ") and why in message
    assert value not in message


def test_credentials_of_the_right_shape_are_taken():
    settings = load_settings(
        {"DISCORD_TOKEN": DISCORD_TOKEN, "SLACK_BOT_TOKEN": "xoxe.xoxb-1-rotated", "SLACK_APP_TOKEN": "xapp-1-A1-2-ab"}
    )
    assert (settings.discord_token, settings.slack_bot_token) == (DISCORD_TOKEN, "xoxe.xoxb-1-rotated")


def test_combinations_are_checked():
    with pytest.raises(ConfigError, match="xapp-"):
        load_settings({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xoxb-wrong"})
    with pytest.raises(ConfigError, match="DISCORD_SHARD_COUNT"):
        load_settings({"DISCORD_SHARD_IDS": "0,1"})
    with pytest.raises(ConfigError, match="below DISCORD_SHARD_COUNT"):
        load_settings({"DISCORD_SHARD_IDS": "0,2", "DISCORD_SHARD_COUNT": "2"})
    with pytest.raises(ConfigError, match="SLACK_THREAD_FOLLOWUPS.*SLACK_REPLY_IN_THREAD=on"):
        load_settings({"SLACK_THREAD_FOLLOWUPS": "on", "SLACK_REPLY_IN_THREAD": "off"})


def test_shards_by_process_number_give_each_process_its_block():
    shards = {"DISCORD_SHARD_COUNT": "6", "DISCORD_SHARDS_PER_PROCESS": "2"}
    assert [load_settings(shards | {"DISCORD_PROCESS_INDEX": str(i)}).discord_shard_ids for i in range(3)] == [
        (0, 1), (2, 3), (4, 5)
    ]
    one = load_settings({"DISCORD_SHARD_COUNT": "3", "DISCORD_SHARDS_PER_PROCESS": "1", "DISCORD_PROCESS_INDEX": "2"})
    assert (one.discord_shard_count, one.discord_shard_ids) == (3, (2,))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARDS_PER_PROCESS": "2", "DISCORD_PROCESS_INDEX": "2"},
         "DISCORD_PROCESS_INDEX='2' is not valid: DISCORD_SHARD_COUNT=4 at 2 shards a process makes 2 processes: "
         "use 0 to 1"),
        ({"DISCORD_SHARD_COUNT": "5", "DISCORD_SHARDS_PER_PROCESS": "2", "DISCORD_PROCESS_INDEX": "0"},
         "DISCORD_SHARDS_PER_PROCESS='2' is not valid: use a divisor of DISCORD_SHARD_COUNT (5), "
         "so that every shard has a process"),
        # A cluster without the pod-index label gives the variable an empty value.
        ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARDS_PER_PROCESS": "2", "DISCORD_PROCESS_INDEX": ""},
         "DISCORD_PROCESS_INDEX is missing: DISCORD_SHARDS_PER_PROCESS is set, so set this process's number from 0 "
         "(on Kubernetes 1.28 and later the pod's apps.kubernetes.io/pod-index label gives it)"),
        ({"DISCORD_SHARD_COUNT": "4", "DISCORD_PROCESS_INDEX": "1"},
         "DISCORD_SHARDS_PER_PROCESS is missing: DISCORD_PROCESS_INDEX is set, so set how many shards each process "
         "serves"),
        ({"DISCORD_SHARDS_PER_PROCESS": "2", "DISCORD_PROCESS_INDEX": "1"},
         "DISCORD_SHARD_COUNT is missing: DISCORD_SHARDS_PER_PROCESS is set, so set DISCORD_SHARD_COUNT to the total "
         "number of shards"),
        ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARD_IDS": "0,1", "DISCORD_SHARDS_PER_PROCESS": "2",
          "DISCORD_PROCESS_INDEX": "0"},
         "DISCORD_SHARD_IDS='0,1' is not valid: set either DISCORD_SHARD_IDS or DISCORD_PROCESS_INDEX with "
         "DISCORD_SHARDS_PER_PROCESS, not both"),
        ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARDS_PER_PROCESS": "2", "DISCORD_PROCESS_INDEX": "-1"},
         "DISCORD_PROCESS_INDEX='-1' is not valid: use a whole number >= 0"),
        ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARDS_PER_PROCESS": "0", "DISCORD_PROCESS_INDEX": "0"},
         "DISCORD_SHARDS_PER_PROCESS='0' is not valid: use a whole number >= 1"),
    ],
)
def test_shards_by_process_number_are_checked_like_every_setting(env, message):
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert str(error.value) == message


def test_web_settings_are_parsed():
    settings = load_settings({"WEB_ALLOWED_HOSTS": "Bot.Example.com, .corp.example [::1] *",
                              "WEB_RATE_LIMIT_PER_MINUTE": "0", "WEB_QUEUE_PERCENT": "25",
                              "CONVERSATION_QUEUE_SIZE": "3"})  # fmt: skip
    assert settings.web_allowed_hosts == {"bot.example.com", ".corp.example", "::1", "*"}
    assert (settings.web_rate_limit_per_minute, settings.web_queue_percent) == (0, 25)
    assert settings.conversation_queue_size == 3


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

    read = set(re.findall(r'env\.\w+\(\s*"([A-Z0-9_]+)"', inspect.getsource(bot.config)))
    example = dotenv_values(Path(bot.config.__file__).parent.parent / ".env.example")
    assert read == set(example)
    values = {k: v for k, v in example.items() if v and k != "BLENDERBOT_MODEL"}
    load_settings(values)  # the example's values are all valid


def test_slack_suggested_prompts_are_split_on_bars_and_checked():
    from bot.config import DEFAULT_SLACK_PROMPTS

    assert load_settings({}).slack_suggested_prompts == DEFAULT_SLACK_PROMPTS
    assert load_settings({"SLACK_SUGGESTED_PROMPTS": "Hi, how are you? | Tell me a joke"}).slack_suggested_prompts == (
        "Hi, how are you?", "Tell me a joke")
    assert load_settings({"SLACK_SUGGESTED_PROMPTS": "off"}).slack_suggested_prompts == ()
    for bad in ("a|b|c|d|e", "a||b", "x" * 201):
        with pytest.raises(ConfigError, match="SLACK_SUGGESTED_PROMPTS"):
            load_settings({"SLACK_SUGGESTED_PROMPTS": bad})
