"""`blender-chat run`: the long-lived process. Loads the model once, starts the
engine, the web server and every adapter whose credentials are set, and on
SIGTERM/SIGINT shuts them down in order, letting replies in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.config import Settings
from bot.engine import ReplyEngine

if TYPE_CHECKING:
    from bot.shared import SharedState

log = logging.getLogger(__name__)

NO_PLATFORMS_HINT = (
    "No Discord or Slack credentials set: only the web chat runs. To add Discord set DISCORD_TOKEN; "
    "to add Slack set SLACK_BOT_TOKEN and SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode)."
)


class StartupError(Exception):
    """Start-up cannot go on; `str(error)` is the one line for the operator."""


def run(settings: Settings) -> int:
    """Run until a signal; the exit status."""
    from bot.model import ModelLoadError

    try:
        return asyncio.run(_serve(settings))
    except (ModelLoadError, StartupError) as error:
        print(f"blender-chat: {error}", file=sys.stderr)
        return 2 if isinstance(error, ModelLoadError) else 1


def build_adapters(settings: Settings, engine: ReplyEngine, shared: SharedState | None = None) -> list[Any]:
    """One adapter per platform with credentials; imported only then, so a
    deployment without Slack never loads slack_bolt. With `shared`, Slack's
    events are de-duplicated in Redis, across replicas."""
    adapters: list[Any] = []
    try:
        if settings.discord_token:
            from adapters.discord import DiscordAdapter

            adapters.append(DiscordAdapter(settings, engine))
        if settings.slack_bot_token:
            from adapters.slack import SlackAdapter

            adapters.append(SlackAdapter(settings, engine, dedupe=shared.dedupe if shared else None))
    except ImportError as error:
        raise StartupError(f"a platform adapter could not be loaded: {error}") from None
    return adapters


async def _serve(settings: Settings) -> int:
    from bot.cli import open_engine

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _install_signal_handlers(loop, stop)

    started = time.monotonic()
    engine, shared = await open_engine(settings)
    log.info("Model ready in %.1fs", time.monotonic() - started)
    try:
        if stop.is_set():  # a signal came while the model was loading: nothing runs yet
            log.info("Stopped before start-up finished")
            return 0
        if shared is not None:
            log.info("Sharing conversation locks, rate limits and event de-duplication through Redis")
        await _serve_engine(settings, engine, shared, stop)
    finally:
        if shared is not None:
            await shared.close()
    log.info("Stopped")
    return 0


async def start_engine(settings: Settings, engine: ReplyEngine) -> None:
    """`engine.start()`, with a memory store that cannot be opened as one line for the operator."""
    try:
        await engine.start()
    except Exception as error:  # an unwritable or corrupt SQLite file... (an unreachable Redis only logs)
        store = _safe_url(settings.memory_url)
        raise StartupError(f"the memory store ({store}) could not be opened: {error}") from None


async def _serve_engine(
    settings: Settings, engine: ReplyEngine, shared: SharedState | None, stop: asyncio.Event
) -> None:
    from bot.web import build_app

    await start_engine(settings, engine)
    adapters: list[Any] = []
    runner: web.AppRunner | None = None
    try:
        adapters = build_adapters(settings, engine, shared)
        app = build_app(
            engine, settings, adapters, shared=shared, caller_limiter=shared.web_limiter if shared else None
        )
        for adapter in adapters:
            if hasattr(adapter, "mount"):  # Slack in HTTP mode receives its events on our server
                adapter.mount(app)
        # The drain below has already waited for handlers; cleanup only needs a moment.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        try:
            await site.start()
        except OSError as error:
            raise StartupError(
                f"cannot listen on {settings.http_host}:{settings.http_port} ({error.strerror}); "
                "set HTTP_HOST/HTTP_PORT to a free address"
            ) from None
        log.info("Web server listening on http://%s:%d", settings.http_host, _bound_port(runner))
        await _start_adapters(adapters)
        if adapters:
            log.info("Running: %s and the web chat", ", ".join(adapter.name for adapter in adapters))
        else:
            log.info(NO_PLATFORMS_HINT)
        await stop.wait()
        await _shutdown(settings, engine, adapters, app)
    finally:
        await _close(engine, adapters, runner)


async def _start_adapters(adapters: list[Any]) -> None:
    for adapter in adapters:
        try:
            await adapter.start()
        except Exception as error:  # any failure to connect ends start-up, with one line
            raise StartupError(f"{adapter.name} could not start: {error}") from None


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # Second signal: the operator does not want to wait. Skip cleanup (and the
            # inference thread, which would otherwise be joined at interpreter exit).
            print(f"blender-chat: second {name}, exiting at once with status {128 + signum}", file=sys.stderr)
            os._exit(128 + signum)
        log.info("%s received: finishing replies in flight, refusing new ones (Ctrl-C again to quit now)", name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def _shutdown(settings: Settings, engine: ReplyEngine, adapters: list[Any], app: web.Application) -> None:
    """Stop taking messages everywhere, then wait (up to SHUTDOWN_GRACE) for the replies in flight."""
    from bot.web import STATE

    state = app[STATE]
    state.stop_accepting()
    engine.stop_accepting()
    for adapter in adapters:
        adapter.stop_accepting()
    grace = settings.shutdown_grace
    drained = await asyncio.gather(
        engine.drain(grace), state.drain(grace), *(adapter.drain(grace) for adapter in adapters)
    )
    if not all(drained):
        log.warning("Some replies were still running after SHUTDOWN_GRACE=%gs and were dropped", grace)


async def _close(engine: ReplyEngine, adapters: list[Any], runner: web.AppRunner | None) -> None:
    """Release everything, each step bounded so a stuck platform cannot hold the exit."""
    for adapter in adapters:
        try:
            await asyncio.wait_for(adapter.close(), 5.0)
        except Exception:
            log.exception("Closing %s failed", adapter.name)
    if runner is not None:
        await runner.cleanup()
    await engine.close(timeout=0)


def _bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (differs from HTTP_PORT when that is 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return address[1]
    return 0


def _safe_url(url: str) -> str:
    """A memory URL without any password in it, fit for a log line."""
    return re.sub(r"//[^@/]*@", "//***@", url)
