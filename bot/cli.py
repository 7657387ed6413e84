"""The `blender-chat` command (also `python -m bot`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from bot.config import ConfigError, Settings, load_settings
from bot.redact import SecretRedactor, redact, secret_values

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
    setup_logging(_terminal_level(settings.log_level, args), secret_values(settings))
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
    # The log would print its INFO lines between `you>` and `bot>`: only warnings, unless debugging.
    chat.set_defaults(command=_chat, quietest_log="WARNING")

    run = commands.add_parser("run", help="run the bot: web chat and API, and Discord/Slack when configured")
    run.set_defaults(command=_run)

    download = commands.add_parser(
        "download", help="download the configured model into the Hugging Face cache and convert it for CTranslate2"
    )
    download.set_defaults(command=_download)
    return parser


def _terminal_level(level: str, args: argparse.Namespace) -> str:
    """LOG_LEVEL, raised to the command's `quietest_log` unless it is DEBUG."""
    quietest = getattr(args, "quietest_log", None)
    if quietest is None or level == "DEBUG":
        return level
    return max(level, quietest, key=logging.getLevelName)


def setup_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Log to standard error, with `secrets` and token-shaped text redacted.

    The Hugging Face hub library prints its warnings (download retries...) through
    a handler of its own, beside the copy that reaches ours, and unredacted: with
    that handler gone they are logged once, through ours."""
    from huggingface_hub.utils import logging as hub_logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    redactor = SecretRedactor(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    hub_root = hub_logging.get_logger()
    for handler in list(hub_root.handlers):
        hub_root.removeHandler(handler)
    hub_logging.enable_propagation()


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from bot.chat import chat
    from bot.startup import StartupError, open_engine, start_engine

    async def session() -> None:
        print(f"Loading {settings.model} ...", flush=True)  # the terminal log shows warnings only
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
    except StartupError as error:
        print(f"blender-chat: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print()
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from bot.runtime import run

    return run(settings)


def _download(settings: Settings, args: argparse.Namespace) -> int:
    """Fetch the model (a hub id) and, where CTranslate2 will serve it, convert it
    now, so the first start does neither (the image build runs this)."""
    from bot.chat_model import ModelLoadError, download_model
    from bot.model import choose_runtime

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
    from bot.chat_model import ModelLoadError, open_checkpoint
    from bot.ct2_model import CTranslate2Unavailable, converted_model

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
