"""The `blender-chat` command (also `python -m bot`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import ConfigError, Settings, load_settings
from bot.redact import SecretRedactor, redact, secret_values

if TYPE_CHECKING:
    from bot.engine import ReplyEngine
    from bot.shared import SharedState

log = logging.getLogger("bot")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        # Secret settings are already hidden; this also catches a token pasted into the wrong variable.
        print(f"blender-chat: {redact(str(error))}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, secret_values(settings))
    return args.command(settings, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blender-chat", description="A Discord and Slack chat bot answered by BlenderBot, running locally."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="chat with the bot in this terminal")
    chat.add_argument(
        "--conversation", default="terminal:default", help="conversation id; reuse one to resume it (default: %(default)s)"
    )
    chat.set_defaults(command=_chat)

    run = commands.add_parser("run", help="run the bot: web chat and API, and Discord/Slack when configured")
    run.set_defaults(command=_run)

    download = commands.add_parser(
        "download", help="download the configured model into the Hugging Face cache and convert it for CTranslate2"
    )
    download.set_defaults(command=_download)
    return parser


def setup_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Log to standard error, with `secrets` and token-shaped text redacted."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    redactor = SecretRedactor(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)


async def open_engine(settings: Settings) -> tuple[ReplyEngine, SharedState | None]:
    """Load the model (on a thread, it takes a while) and build the engine.

    With Redis configured (REDIS_URL, or a redis:// MEMORY_URL) the engine takes
    its conversation locks and rate limits from Redis, and the `SharedState` comes
    back too: its `dedupe` is for the Slack adapter, its `ping` for /readyz.
    Close it after the engine. Nothing connects yet, so a Redis that is down does
    not stop the start."""
    from bot.engine import ReplyEngine
    from bot.memory import open_store
    from bot.metrics import Metrics
    from bot.model import load_chat_model
    from bot.shared import SharedState

    model = await asyncio.to_thread(load_chat_model, settings)
    metrics = Metrics()
    shared = SharedState.from_settings(settings, metrics=metrics)
    store = open_store(settings.memory_url, max_turns=settings.memory_max_turns, ttl=settings.memory_ttl)
    engine = ReplyEngine(
        model,
        store,
        settings,
        metrics=metrics,
        shared_lock=shared.locks if shared else None,
        limiter=shared.limiter if shared else None,
    )
    return engine, shared


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from bot.chat import chat
    from bot.model import ModelLoadError
    from bot.runtime import StartupError, start_engine

    async def session() -> None:
        engine, shared = await open_engine(settings)
        try:
            await start_engine(settings, engine)
            try:
                await chat(engine, args.conversation)
            finally:
                await engine.close()
        finally:
            if shared is not None:
                await shared.close()

    try:
        asyncio.run(session())
    except (ModelLoadError, StartupError) as error:
        print(f"blender-chat: {error}", file=sys.stderr)
        return 2 if isinstance(error, ModelLoadError) else 1
    except KeyboardInterrupt:
        print()
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from bot.runtime import run

    return run(settings)


def _download(settings: Settings, args: argparse.Namespace) -> int:
    """Fetch the model (a hub id) and, where CTranslate2 will serve it, convert it
    now, so the first start does neither (the image build runs this)."""
    from bot.model import ModelLoadError, choose_runtime, download_model

    if Path(settings.model).is_dir():
        print(f"BLENDERBOT_MODEL is the local directory {settings.model}: nothing to download.")
    else:
        started = time.monotonic()
        try:
            path = download_model(settings.model)
        except ModelLoadError as error:
            print(f"blender-chat: {error}", file=sys.stderr)
            return 1
        files = [file for file in Path(path).rglob("*") if file.is_file()]
        size = sum(file.stat().st_size for file in files)
        print(
            f"Downloaded {settings.model}: {len(files)} files, {size / 1e6:,.0f} MB, in {path} "
            f"({time.monotonic() - started:.0f}s)"
        )
    if choose_runtime(settings) != "ctranslate2":
        return 0
    return _convert(settings)


def _convert(settings: Settings) -> int:
    from bot.ct2_model import CTranslate2Unavailable, converted_model
    from bot.model import ModelLoadError, open_checkpoint

    started = time.monotonic()
    try:
        path = converted_model(settings, open_checkpoint(settings.model))
    except (ModelLoadError, CTranslate2Unavailable) as error:
        if settings.runtime == "ctranslate2":
            print(f"blender-chat: {error}", file=sys.stderr)
            return 1
        print(f"blender-chat: {error}; `blender-chat run` will use transformers instead", file=sys.stderr)
        return 0
    size = sum(file.stat().st_size for file in path.iterdir() if file.is_file())
    print(f"CTranslate2 model of {settings.model}: {size / 1e6:,.0f} MB in {path} ({time.monotonic() - started:.0f}s)")
    return 0
