"""Settings: read once at start-up from the environment (and a `.env` file).

`load_settings()` is the only place that reads configuration. A bad value
raises `ConfigError` naming the variable, the value and what is allowed; only
the CLI turns that into a message and an exit status.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from bot.prompt import persona_lines

DEFAULT_MODEL = "facebook/blenderbot-400M-distill"
DISCORD_API_DEFAULT = "https://discord.com/api/v10"
DISCORD_GATEWAY_DEFAULT = "wss://gateway.discord.gg"
SLACK_API_DEFAULT = "https://slack.com/api/"
DEFAULT_DEFLECTION = "I'd rather not talk about that. Let's talk about something else!"
DEFAULT_SLACK_PROMPTS = (
    "Tell me something interesting",
    "What do you like to do for fun?",
    "Recommend a good book",
    "Let's talk about music",
)
MAX_SLACK_PROMPTS = 4  # Slack shows at most four suggested prompts
MAX_SLACK_PROMPT_CHARS = 200

# Variables whose values are never printed, not even in an error message.
SECRET_VARIABLES = frozenset(
    {"DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "WEB_API_TOKEN"}
)


class ConfigError(ValueError):
    """One bad setting: `str(error)` is the one line shown to the operator.
    A `value` of None means the setting is needed but unset."""

    def __init__(self, variable: str, value: str | None, allowed: str) -> None:
        if value is None:
            super().__init__(f"{variable} is missing: {allowed}")
        else:
            shown = "<hidden>" if variable in SECRET_VARIABLES else repr(value)
            super().__init__(f"{variable}={shown} is not valid: {allowed}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    # Model
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda
    num_beams: int | None = None  # None: the checkpoint's generation_config
    min_new_tokens: int | None = None
    max_new_tokens: int | None = None
    quantize: str = "auto"  # auto | int8 | none
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 (CUDA only)
    threads: int | None = None  # None: the cores available to the process
    runtime: str = "auto"  # auto | ctranslate2 | transformers
    ct2_dir: Path = Path("data/ctranslate2")  # converted models, built once per checkpoint

    # What the bot says about itself (bot/prompt.py); a channel's own persona replaces it
    persona: tuple[str, ...] = ()

    # Engine
    batch_size: int = 32  # conversations per batch
    batch_max_rows: int = 80  # conversations x beams per generate call (benchmarks/README.md)
    batch_wait_ms: int = 20
    queue_size: int = 256
    conversation_queue_size: int = 8  # messages of one conversation in line (answered or waiting)
    reply_timeout: float = 120.0
    max_input_chars: int = 2000

    # Memory
    memory_url: str = "sqlite:///data/memory.db"
    memory_max_turns: int = 20
    memory_ttl: float = 30 * 86400.0  # seconds; 0 keeps conversations forever
    inbox_max_age: float = 600.0  # messages older than this are not answered after a crash
    inbox_lease: float = 30.0  # a message nobody renewed for this long is answered by another process

    # Process and web server
    log_level: str = "INFO"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    web_api_token: str | None = None
    web_allowed_hosts: frozenset[str] = frozenset()  # besides this server's own names and loopback
    web_rate_limit_per_minute: int = 60  # per web API caller (its token, else its address); 0: off
    web_queue_percent: int = 50  # most of QUEUE_SIZE the web API may fill
    shutdown_grace: float = 8.0

    # Discord
    discord_token: str | None = None
    discord_api_url: str = DISCORD_API_DEFAULT
    discord_gateway_url: str = DISCORD_GATEWAY_DEFAULT
    discord_guild_ids: frozenset[str] = frozenset()
    discord_channel_ids: frozenset[str] = frozenset()
    discord_dms: bool = True
    discord_message_content: bool = False
    discord_shard_count: int | None = None
    discord_shard_ids: tuple[int, ...] = ()

    # Slack
    slack_bot_token: str | None = None
    slack_app_token: str | None = None
    slack_signing_secret: str | None = None
    slack_api_url: str = SLACK_API_DEFAULT
    slack_team_ids: frozenset[str] = frozenset()
    slack_channel_ids: frozenset[str] = frozenset()
    slack_reply_in_thread: bool = True
    slack_thread_followups: bool = False
    slack_suggested_prompts: tuple[str, ...] = DEFAULT_SLACK_PROMPTS
    slack_admin_users: frozenset[str] = frozenset()  # may use /blenderbot in channels, besides admins and owners

    # Safety and abuse limits
    safety: bool = True
    safety_blocklist: Path | None = None
    safety_allowlist: Path | None = None
    safety_deflection: str = DEFAULT_DEFLECTION
    rate_limit_burst: int = 5
    rate_limit_per_minute: float = 10.0
    blocked_users: frozenset[str] = field(default_factory=frozenset)

    # Shared state for several replicas
    redis_url: str | None = None

    @property
    def memory_path(self) -> Path | None:
        """The SQLite file behind `memory_url`, or None for other backends."""
        if self.memory_url.startswith("sqlite:///"):
            return Path(self.memory_url[len("sqlite:///") :])
        return None


def load_settings(environ: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
    """Build `Settings` from `environ` (default: `os.environ` plus `.env`)."""
    if environ is None:
        if dotenv:
            from dotenv import find_dotenv, load_dotenv

            # The .env of the directory the bot is started in (or a parent), never the package's.
            load_dotenv(find_dotenv(usecwd=True), override=False)
        environ = os.environ
    env = _Reader(environ)

    data_dir = env.text("DATA_DIR", "data")
    memory_url = env.text("MEMORY_URL", f"sqlite:///{data_dir}/memory.db")
    _check_memory_url(memory_url)

    settings = Settings(
        model=_check_model(env.text("BLENDERBOT_MODEL", DEFAULT_MODEL)),
        device=env.choice("BLENDERBOT_DEVICE", "auto", ("auto", "cpu", "cuda")),
        num_beams=env.integer("BLENDERBOT_NUM_BEAMS", None, minimum=1),
        min_new_tokens=env.integer("BLENDERBOT_MIN_NEW_TOKENS", None, minimum=0),
        max_new_tokens=env.integer("BLENDERBOT_MAX_NEW_TOKENS", None, minimum=1),
        quantize=env.choice("BLENDERBOT_QUANTIZE", "auto", ("auto", "int8", "none")),
        dtype=env.choice("BLENDERBOT_DTYPE", "auto", ("auto", "float32", "float16", "bfloat16")),
        threads=env.integer("BLENDERBOT_THREADS", None, minimum=1),
        runtime=env.choice("BLENDERBOT_RUNTIME", "auto", ("auto", "ctranslate2", "transformers")),
        ct2_dir=_check_ct2_dir(env.text("BLENDERBOT_CT2_DIR", f"{data_dir}/ctranslate2")),
        batch_size=env.integer("BATCH_SIZE", 32, minimum=1),
        batch_max_rows=env.integer("BATCH_MAX_ROWS", 80, minimum=1),
        batch_wait_ms=env.integer("BATCH_WAIT_MS", 20, minimum=0),
        queue_size=env.integer("QUEUE_SIZE", 256, minimum=1),
        conversation_queue_size=env.integer("CONVERSATION_QUEUE_SIZE", 8, minimum=1),
        reply_timeout=env.duration("REPLY_TIMEOUT", 120.0, minimum=1.0),
        max_input_chars=env.integer("MAX_INPUT_CHARS", 2000, minimum=1),
        persona=persona_lines(env.text("PERSONA", "")),
        memory_url=memory_url,
        memory_max_turns=env.integer("MEMORY_MAX_TURNS", 20, minimum=1),
        memory_ttl=env.duration("MEMORY_TTL", 30 * 86400.0, minimum=0.0),
        inbox_max_age=env.duration("INBOX_MAX_AGE", 600.0, minimum=0.0),
        inbox_lease=env.duration("INBOX_LEASE", 30.0, minimum=1.0),
        log_level=env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
        http_host=env.text("HTTP_HOST", "127.0.0.1"),
        http_port=env.integer("HTTP_PORT", 8080, minimum=0, maximum=65535),
        web_api_token=env.optional("WEB_API_TOKEN"),
        web_allowed_hosts=env.hosts("WEB_ALLOWED_HOSTS"),
        web_rate_limit_per_minute=env.integer("WEB_RATE_LIMIT_PER_MINUTE", 60, minimum=0),
        web_queue_percent=env.integer("WEB_QUEUE_PERCENT", 50, minimum=1, maximum=100),
        shutdown_grace=env.duration("SHUTDOWN_GRACE", 8.0, minimum=0.0),
        discord_token=env.optional("DISCORD_TOKEN"),
        discord_api_url=env.url("DISCORD_API_URL", DISCORD_API_DEFAULT, ("http", "https")),
        discord_gateway_url=env.url("DISCORD_GATEWAY_URL", DISCORD_GATEWAY_DEFAULT, ("ws", "wss")),
        discord_guild_ids=env.ids("DISCORD_GUILD_IDS", digits=True),
        discord_channel_ids=env.ids("DISCORD_CHANNEL_IDS", digits=True),
        discord_dms=env.flag("DISCORD_DMS", True),
        discord_message_content=env.flag("DISCORD_MESSAGE_CONTENT", False),
        discord_shard_count=env.integer("DISCORD_SHARD_COUNT", None, minimum=1),
        discord_shard_ids=_shard_ids(env),
        slack_bot_token=env.optional("SLACK_BOT_TOKEN"),
        slack_app_token=env.optional("SLACK_APP_TOKEN"),
        slack_signing_secret=env.optional("SLACK_SIGNING_SECRET"),
        slack_api_url=env.url("SLACK_API_URL", SLACK_API_DEFAULT, ("http", "https")),
        slack_team_ids=env.ids("SLACK_TEAM_IDS"),
        slack_channel_ids=env.ids("SLACK_CHANNEL_IDS"),
        slack_reply_in_thread=env.flag("SLACK_REPLY_IN_THREAD", True),
        slack_thread_followups=env.flag("SLACK_THREAD_FOLLOWUPS", False),
        slack_suggested_prompts=_check_prompts(env.optional("SLACK_SUGGESTED_PROMPTS")),
        slack_admin_users=env.ids("SLACK_ADMIN_USERS"),
        safety=env.flag("SAFETY", True),
        safety_blocklist=env.readable_file("SAFETY_BLOCKLIST"),
        safety_allowlist=env.readable_file("SAFETY_ALLOWLIST"),
        safety_deflection=env.text("SAFETY_DEFLECTION", DEFAULT_DEFLECTION),
        rate_limit_burst=env.integer("RATE_LIMIT_BURST", 5, minimum=1),
        rate_limit_per_minute=env.number("RATE_LIMIT_PER_MINUTE", 10.0, minimum=0.0),
        blocked_users=env.ids("BLOCKED_USERS"),
        redis_url=_check_redis_url(env.optional("REDIS_URL")),
    )
    _check_combinations(settings)
    return settings


class _Reader:
    """Typed reads of environment variables; each raises `ConfigError`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def choice(self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in allowed:
            raise ConfigError(name, raw, "use one of " + ", ".join(allowed))
        return value

    def integer(
        self, name: str, default: int | None, *, minimum: int, maximum: int | None = None
    ) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, raw, _range_text("a whole number", minimum, maximum)) from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ConfigError(name, raw, _range_text("a whole number", minimum, maximum))
        return value

    def number(self, name: str, default: float, *, minimum: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, raw, _range_text("a number", minimum, None)) from None
        if not value >= minimum or value == float("inf"):
            raise ConfigError(name, raw, _range_text("a number", minimum, None))
        return value

    def duration(self, name: str, default: float, *, minimum: float) -> float:
        """Seconds, given as `90`, `90s`, `15m`, `12h` or `30d`."""
        raw = self._raw(name)
        if raw is None:
            return default
        allowed = f"a duration such as 90s, 15m, 12h or 30d (plain numbers are seconds), at least {minimum:g}s"
        seconds = parse_duration(raw)
        if seconds is None or seconds < minimum:
            raise ConfigError(name, raw, allowed)
        return seconds

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, raw, "use on or off (also true/false, yes/no, 1/0)")

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        parsed = urlparse(raw)
        if parsed.scheme not in schemes or not parsed.netloc:
            raise ConfigError(name, raw, "use a URL starting with " + " or ".join(f"{s}://" for s in schemes))
        return raw

    def ids(self, name: str, *, digits: bool = False) -> frozenset[str]:
        """A comma- or space-separated list of ids; empty means no restriction."""
        raw = self._raw(name)
        if raw is None:
            return frozenset()
        items = [item for item in re.split(r"[,\s]+", raw) if item]
        pattern = r"\d+" if digits else r"[A-Za-z0-9_.:-]+"
        if not all(re.fullmatch(pattern, item) for item in items):
            kind = "numeric ids" if digits else "ids"
            raise ConfigError(name, raw, f"use {kind} separated by commas")
        return frozenset(items)

    def hosts(self, name: str) -> frozenset[str]:
        """Host names or addresses, comma-separated: `bot.example.com`, `.example.com`
        (the domain and its subdomains), `10.0.0.5`, `::1`, or `*` for any."""
        raw = self._raw(name)
        if raw is None:
            return frozenset()
        items = [item.lower().strip("[]") for item in re.split(r"[,\s]+", raw) if item]
        if not all(item == "*" or re.fullmatch(r"\.?[a-z0-9_.:-]+", item) for item in items):
            raise ConfigError(name, raw, "use host names or addresses separated by commas (.example.com for subdomains)")
        return frozenset(items)

    def readable_file(self, name: str) -> Path | None:
        raw = self._raw(name)
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(name, raw, "use the path of a readable text file")
        return path


def parse_duration(text: str) -> float | None:
    """Seconds for `90`, `90s`, `15m`, `12h` or `30d`; None if `text` is none of these."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip().lower())
    if not match:
        return None
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _range_text(kind: str, minimum: int | float, maximum: int | float | None) -> str:
    if maximum is None:
        return f"use {kind} >= {minimum:g}"
    return f"use {kind} from {minimum:g} to {maximum:g}"


def _check_model(value: str) -> str:
    """A local directory must exist; anything else must be shaped like a hub id."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or path.exists():
        raise ConfigError("BLENDERBOT_MODEL", value, "that model directory does not exist; use an existing directory or a hub id")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value):
        raise ConfigError(
            "BLENDERBOT_MODEL", value, "use a hub id such as facebook/blenderbot-400M-distill or a model directory"
        )
    return value


def _check_memory_url(value: str) -> None:
    allowed = "use sqlite:///path/to/file.db, memory:// or redis://host:port/db"
    if value == "memory://" or value.startswith(("redis://", "rediss://")):
        return
    if not value.startswith("sqlite:///") or value == "sqlite:///":
        raise ConfigError("MEMORY_URL", value, allowed)
    path = Path(value[len("sqlite:///") :]).expanduser()
    if path.is_dir():
        raise ConfigError("MEMORY_URL", value, "the path is a directory; " + allowed)
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError("MEMORY_URL", value, "the database file must be readable and writable")
        return
    parent = _nearest_existing_parent(path)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("MEMORY_URL", value, f"cannot create the database under {parent}; use a writable path")


def _check_prompts(value: str | None) -> tuple[str, ...]:
    """Up to four prompts separated by `|` (prompts may hold commas); `off`: none."""
    if value is None:
        return DEFAULT_SLACK_PROMPTS
    if value.lower() == "off":
        return ()
    prompts = tuple(prompt.strip() for prompt in value.split("|"))
    if (
        len(prompts) > MAX_SLACK_PROMPTS
        or not all(prompts)
        or any(len(prompt) > MAX_SLACK_PROMPT_CHARS for prompt in prompts)
    ):
        raise ConfigError(
            "SLACK_SUGGESTED_PROMPTS", value,
            f"use 1 to {MAX_SLACK_PROMPTS} prompts of at most {MAX_SLACK_PROMPT_CHARS} characters separated by |, "
            "or off",
        )
    return prompts


def _shard_ids(env: _Reader) -> tuple[int, ...]:
    """This process's Discord shards: listed in DISCORD_SHARD_IDS, or the block of
    DISCORD_SHARDS_PER_PROCESS ids at DISCORD_PROCESS_INDEX (process i serves i*n .. i*n+n-1),
    the form a Kubernetes StatefulSet can give every pod from its index without a manifest per pod."""
    listed = env.ids("DISCORD_SHARD_IDS", digits=True)
    per_process = env.integer("DISCORD_SHARDS_PER_PROCESS", None, minimum=1)
    index = env.integer("DISCORD_PROCESS_INDEX", None, minimum=0)
    if per_process is None and index is None:
        return tuple(int(i) for i in sorted(listed, key=int))
    if listed:
        raise ConfigError(
            "DISCORD_SHARD_IDS", ",".join(sorted(listed, key=int)),
            "set either DISCORD_SHARD_IDS or DISCORD_PROCESS_INDEX with DISCORD_SHARDS_PER_PROCESS, not both",
        )
    if index is None:
        raise ConfigError(
            "DISCORD_PROCESS_INDEX", None,
            "DISCORD_SHARDS_PER_PROCESS is set, so set this process's number from 0 (on Kubernetes 1.28 and later "
            "the pod's apps.kubernetes.io/pod-index label gives it)",
        )
    if per_process is None:
        raise ConfigError(
            "DISCORD_SHARDS_PER_PROCESS", None,
            "DISCORD_PROCESS_INDEX is set, so set how many shards each process serves",
        )
    count = env.integer("DISCORD_SHARD_COUNT", None, minimum=1)
    if count is None:
        raise ConfigError(
            "DISCORD_SHARD_COUNT", None,
            "DISCORD_SHARDS_PER_PROCESS is set, so set DISCORD_SHARD_COUNT to the total number of shards",
        )
    if count % per_process:
        # The shards past the last whole block would have no process: their guilds never answered.
        raise ConfigError(
            "DISCORD_SHARDS_PER_PROCESS", str(per_process),
            f"use a divisor of DISCORD_SHARD_COUNT ({count}), so that every shard has a process",
        )
    processes = count // per_process
    if index >= processes:
        raise ConfigError(
            "DISCORD_PROCESS_INDEX", str(index),
            f"DISCORD_SHARD_COUNT={count} at {per_process} shards a process makes {processes} processes: "
            f"use 0 to {processes - 1}",
        )
    return tuple(range(index * per_process, (index + 1) * per_process))


def _check_ct2_dir(value: str) -> Path:
    """Where converted models go: a directory, or a path one can be made at."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("BLENDERBOT_CT2_DIR", value, "it is a file; use a directory for converted models")
    return path


def _check_redis_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("redis://", "rediss://")):
        raise ConfigError("REDIS_URL", value, "use redis://host:port/db or rediss://host:port/db")
    return value


def _check_credentials(settings: Settings) -> None:
    """The shape of the platforms' credentials, checked now rather than when the
    platform refuses them, after the model has loaded: the usual slips are a
    token pasted into the wrong variable and the wrong value copied from a portal."""
    bot_token, app_token, secret = settings.slack_bot_token, settings.slack_app_token, settings.slack_signing_secret
    if bot_token and not bot_token.startswith(("xoxb-", "xoxe.xoxb-")):
        hint = {"xapp-": "that is an app-level token, for SLACK_APP_TOKEN; ", "xoxp-": "that is a user token; "}
        raise ConfigError(
            "SLACK_BOT_TOKEN",
            bot_token,
            hint.get(bot_token[:5], "") + "use the Bot User OAuth Token (xoxb-…) from the app's Install App page",
        )
    if app_token and not app_token.startswith("xapp-"):
        raise ConfigError("SLACK_APP_TOKEN", app_token, "use an app-level token starting with xapp-")
    if secret and secret.startswith(("xox", "xapp-")):
        raise ConfigError(
            "SLACK_SIGNING_SECRET", secret, "that is a token; use Basic Information → Signing Secret of the app"
        )
    if settings.discord_token:
        _check_discord_token(settings.discord_token)


# What else people paste into DISCORD_TOKEN from the Developer Portal.
_NOT_DISCORD_TOKENS = [
    (re.compile(r"\d{15,21}"), "the Application ID"),
    (re.compile(r"[0-9a-f]{64}"), "the Public Key"),
    (re.compile(r"[A-Za-z0-9_-]{32}"), "the OAuth2 Client Secret"),
    (re.compile(r"(xox|xapp-).*"), "a Slack token"),
]


def _check_discord_token(token: str) -> None:
    allowed = "use the bot token from the Developer Portal's Bot page (Reset Token)"
    if token.lower().startswith("bot "):
        raise ConfigError("DISCORD_TOKEN", token, "leave out the 'Bot ' in front; " + allowed)
    if re.search(r"\s", token):
        raise ConfigError("DISCORD_TOKEN", token, "a token has no spaces; " + allowed)
    for shape, what in _NOT_DISCORD_TOKENS:
        if shape.fullmatch(token):
            raise ConfigError("DISCORD_TOKEN", token, f"that looks like {what}, not the bot token; " + allowed)


def _nearest_existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_combinations(settings: Settings) -> None:
    _check_credentials(settings)
    if settings.slack_bot_token and not settings.slack_app_token and not settings.slack_signing_secret:
        raise ConfigError(
            "SLACK_SIGNING_SECRET",
            None,
            "SLACK_BOT_TOKEN is set, so set SLACK_SIGNING_SECRET (HTTP mode) or SLACK_APP_TOKEN (Socket Mode)",
        )
    if settings.slack_thread_followups and not settings.slack_reply_in_thread:
        raise ConfigError(
            "SLACK_THREAD_FOLLOWUPS",
            "on",
            "it needs SLACK_REPLY_IN_THREAD=on (the bot knows the threads it is in by each thread's own memory)",
        )
    if settings.discord_shard_ids and settings.discord_shard_count is None:
        raise ConfigError(
            "DISCORD_SHARD_COUNT", None, "DISCORD_SHARD_IDS is set, so set DISCORD_SHARD_COUNT to the total number of shards"
        )
    if settings.discord_shard_count is not None and any(
        i >= settings.discord_shard_count for i in settings.discord_shard_ids
    ):
        raise ConfigError(
            "DISCORD_SHARD_IDS",
            ",".join(map(str, settings.discord_shard_ids)),
            f"use ids below DISCORD_SHARD_COUNT ({settings.discord_shard_count})",
        )
