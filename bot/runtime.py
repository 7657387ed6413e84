"""`blender-chat run`: the long-lived process. Loads the model once, starts the
engine, the web server and every adapter whose credentials are set, and on
SIGTERM/SIGINT shuts them down in order, letting replies in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from aiohttp import web

from bot.config import Settings
from bot.startup import StartupError, cannot_listen, check_http_port, open_engine, start_engine

if TYPE_CHECKING:  # bot.engine imports torch: only once the HTTP port has been checked
    from adapters.base import Adapter
    from bot.engine import ReplyEngine
    from bot.inbox import Inbox
    from bot.shared import SharedState

log = logging.getLogger(__name__)

HOW_TO_ADD_PLATFORMS = (
    "To add Discord set DISCORD_TOKEN; to add Slack set SLACK_BOT_TOKEN and SLACK_APP_TOKEN (Socket Mode) "
    "or SLACK_SIGNING_SECRET (HTTP mode)."
)


def run(settings: Settings) -> int:
    """Run until a signal; the exit status."""
    try:
        return asyncio.run(_serve(settings))
    except StartupError as error:
        print(f"blender-chat: {error}", file=sys.stderr)
        return error.status


def build_adapters(
    settings: Settings, engine: ReplyEngine, shared: SharedState | None = None, inbox: Inbox | None = None
) -> list[Adapter]:
    """One adapter per platform with credentials; imported only then, so a
    deployment without Slack never loads slack_bolt. Each records what it accepts
    in `inbox`; with `shared`, Slack's greetings are remembered in Redis."""
    adapters: list[Adapter] = []
    try:
        if settings.discord_token:
            from adapters.discord import DiscordAdapter

            adapters.append(DiscordAdapter(settings, engine, inbox=inbox))
        if settings.slack_bot_token:
            from adapters.slack import SlackAdapter

            adapters.append(SlackAdapter(settings, engine, dedupe=shared.dedupe if shared else None, inbox=inbox))
    except ImportError as error:
        raise StartupError(f"a platform adapter could not be loaded: {error}") from None
    return adapters


async def _serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _install_signal_handlers(loop, stop)

    await check_http_port(settings)  # a busy port fails now, not after the model has loaded
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


async def _serve_engine(
    settings: Settings, engine: ReplyEngine, shared: SharedState | None, stop: asyncio.Event
) -> None:
    from bot.inbox import open_inbox
    from bot.web import STATE, build_app

    await start_engine(settings, engine)
    inbox = open_inbox(settings, engine.metrics)
    inbox.attach(engine)  # order across a crash; a forgotten conversation's waiting messages go with it
    await inbox.open()
    adapters: list[Adapter] = []
    runner: web.AppRunner | None = None
    try:
        adapters = build_adapters(settings, engine, shared, inbox)
        app = build_app(
            engine, settings, adapters, shared=shared, caller_limiter=shared.web_limiter if shared else None,
            inbox=inbox,
        )
        for adapter in adapters:
            adapter.mount(app)  # Slack in HTTP mode receives its events on our server
        # The drain below has already waited for handlers; cleanup only needs a moment.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        try:
            await site.start()
        except OSError as error:  # taken since check_http_port
            raise cannot_listen(settings, error) from None
        host = f"[{settings.http_host}]" if ":" in settings.http_host else settings.http_host  # IPv6
        url = f"http://{host}:{_bound_port(runner)}"
        log.info("Web server listening on %s", url)
        await _start_adapters(adapters)
        _log_what_runs(settings, adapters, url)
        # Now that every platform can deliver: answer what a stopped process left unanswered.
        inbox.start({adapter.name: adapter.replay for adapter in adapters} | {"web": app[STATE].replay})
        await stop.wait()
        await _shutdown(settings, engine, adapters, app)
    finally:
        await inbox.close()
        await _close(engine, adapters, runner)


def _log_what_runs(settings: Settings, adapters: list[Adapter], url: str) -> None:
    """One line saying what answers chats, in the same words as the web server's warning."""
    from bot.web import is_loopback

    web_chat = is_loopback(settings.http_host) or bool(settings.web_api_token)
    names = ", ".join(adapter.name for adapter in adapters)
    if adapters and web_chat:
        log.info("Running: %s and the web chat (%s/)", names, url)
    elif adapters:
        log.info("Running: %s (the web chat is disabled: WEB_API_TOKEN is not set)", names)
    elif web_chat:
        log.info("No Discord or Slack credentials set: only the web chat runs, at %s/. %s", url, HOW_TO_ADD_PLATFORMS)
    else:
        log.warning(
            "No Discord or Slack credentials set and the web chat is disabled (WEB_API_TOKEN is not set): "
            "nothing can chat with the bot. Set WEB_API_TOKEN for the web chat. %s",
            HOW_TO_ADD_PLATFORMS,
        )


async def _start_adapters(adapters: list[Adapter]) -> None:
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


async def _shutdown(settings: Settings, engine: ReplyEngine, adapters: list[Adapter], app: web.Application) -> None:
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


async def _close(engine: ReplyEngine, adapters: list[Adapter], runner: web.AppRunner | None) -> None:
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
