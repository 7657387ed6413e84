"""Start-up shared by `blender-chat run` and `blender-chat chat`: the cheap
checks that must fail in a second (the HTTP port), then the composition root
that loads the model and builds the engine, and the opening of its memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Settings

if TYPE_CHECKING:
    from bot.engine import ReplyEngine
    from bot.shared import SharedState

log = logging.getLogger(__name__)


class StartupError(Exception):
    """Start-up cannot go on; `str(error)` is the one line for the operator, `status`
    the exit status (2 for a model that cannot be loaded, like a bad setting)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


async def check_http_port(settings: Settings) -> None:
    """Bind HTTP_HOST:HTTP_PORT the way the web server will, and let it go again,
    so a busy port ends start-up before the model spends a minute loading."""
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(asyncio.Protocol, settings.http_host, settings.http_port, start_serving=False)
    except OSError as error:
        raise cannot_listen(settings, error) from None
    server.close()
    await server.wait_closed()


def cannot_listen(settings: Settings, error: OSError) -> StartupError:
    # asyncio rewords a failed bind as "error while attempting to bind on address ...": the errno says it shorter.
    if error.errno and error.errno > 0 and not isinstance(error, socket.gaierror):
        reason = os.strerror(error.errno)
    else:  # a host name that does not resolve: "Name or service not known"
        reason = error.strerror or str(error)
    return StartupError(
        f"cannot listen on {settings.http_host}:{settings.http_port} ({reason}); "
        "set HTTP_HOST/HTTP_PORT to a free address"
    )


async def open_engine(settings: Settings) -> tuple[ReplyEngine, SharedState | None]:
    """Load the model (on a thread, it takes a while) and build the engine;
    a model that cannot be loaded is a `StartupError` with status 2.

    With Redis configured (REDIS_URL, or a redis:// MEMORY_URL) the engine takes
    its conversation locks and rate limits from Redis, and the `SharedState` comes
    back too: its `dedupe` is for the Slack adapter, its `ping` for /readyz.
    Close it after the engine. Nothing connects yet, so a Redis that is down does
    not stop the start."""
    from bot.chat_model import ModelLoadError
    from bot.engine import ReplyEngine
    from bot.memory import open_store
    from bot.metrics import Metrics
    from bot.model import load_chat_model
    from bot.shared import SharedState

    log.info("Loading %s ...", settings.model)
    try:
        model = await asyncio.to_thread(load_chat_model, settings)
    except ModelLoadError as error:
        raise StartupError(str(error), status=2) from None
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


async def start_engine(settings: Settings, engine: ReplyEngine) -> None:
    """`engine.start()`, with a memory store that cannot be opened as one line for the operator."""
    try:
        await engine.start()
    except Exception as error:  # an unwritable or corrupt SQLite file... (an unreachable Redis only logs)
        store = safe_url(settings.memory_url)
        raise StartupError(f"the memory store ({store}) could not be opened: {error}") from None
    log.info("Conversations are kept %s", memory_location(settings))
    if settings.persona:
        from bot.errors import PersonaRefused

        try:
            await engine.check_persona("|".join(settings.persona))
        except PersonaRefused as error:
            await engine.close(timeout=0)
            raise StartupError(f"PERSONA cannot be used: {error}", status=2) from None


def memory_location(settings: Settings) -> str:
    """Where MEMORY_URL keeps the conversations, in words, without a password."""
    path = settings.memory_path
    if path is not None:
        return f"in the SQLite file {Path(path).expanduser().resolve()}"
    if settings.memory_url == "memory://":
        return "in this process only (MEMORY_URL=memory://): they are forgotten when it stops"
    return f"in Redis at {safe_url(settings.memory_url)}"


def safe_url(url: str) -> str:
    """A memory URL without any password in it, fit for a log line."""
    return re.sub(r"//[^@/]*@", "//***@", url)
