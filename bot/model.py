"""BlenderBot behind one interface, on the runtime that serves it best.

`load_chat_model(settings)` is slow and blocking (seconds; more the first time
a checkpoint is converted for CTranslate2); call it once at start-up. It
returns a `ChatModel` (bot/chat_model.py), whose `generate` is blocking too and
only ever runs on the engine's inference thread, never on the event loop.

Two runtimes implement it, chosen by BLENDERBOT_RUNTIME: CTranslate2
(bot/ct2_model.py, what `auto` picks on CPU: as fast as transformers for one
conversation and several times faster under load, benchmarks/README.md) and
transformers (bot/transformers_model.py, what `auto` picks on a CUDA GPU).
Both take their input ids from bot/prompt.py and decode with the same
`Decoding`: the checkpoint's generation_config with settings overriding it.
Imports run one way: this module sits above the runtimes, which import the
types they share from bot/chat_model.py.

This module imports neither torch nor CTranslate2: a process serving with
CTranslate2 never loads torch (~0.2 GB) unless it has to convert.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bot.chat_model import ChatModel, ModelLoadError, open_checkpoint
from bot.config import Settings

log = logging.getLogger(__name__)


def choose_runtime(settings: Settings) -> str:
    """`transformers` or `ctranslate2` for BLENDERBOT_RUNTIME and BLENDERBOT_DEVICE.
    `auto`: CTranslate2 on the CPU (measured: benchmarks/README.md); transformers on
    a CUDA GPU, where CTranslate2 has not been measured against it."""
    if settings.runtime != "auto":
        return settings.runtime
    if settings.device == "cpu":
        return "ctranslate2"
    if settings.device == "cuda":
        return "transformers"
    return "transformers" if _cuda_usable() else "ctranslate2"


def _cuda_usable() -> bool:
    """Whether torch sees a CUDA GPU, asked only where a driver is installed (so a
    CPU machine does not import torch to find out)."""
    if not Path("/proc/driver/nvidia/version").exists():
        return False
    import torch

    return torch.cuda.is_available()


def load_chat_model(settings: Settings) -> ChatModel:
    """Open the checkpoint and load it on the runtime BLENDERBOT_RUNTIME asks for.
    `auto` falls back to transformers, with one log line, when CTranslate2 cannot
    serve it (conversion failed, a generation option it cannot honour...);
    an explicit `ctranslate2` that cannot work is a `ModelLoadError`."""
    started = time.monotonic()
    checkpoint = open_checkpoint(settings.model)
    runtime = choose_runtime(settings)
    if runtime == "ctranslate2":
        from bot.ct2_model import CTranslate2Unavailable, load_ct2_model

        try:
            model = load_ct2_model(settings, checkpoint)
        except CTranslate2Unavailable as error:
            if settings.runtime == "ctranslate2":
                raise ModelLoadError(f"BLENDERBOT_RUNTIME=ctranslate2 cannot serve {settings.model}: {error}") from None
            log.warning("CTranslate2 cannot serve %s (%s); using transformers instead", settings.model, error)
            runtime = "transformers"
    if runtime == "transformers":
        from bot.transformers_model import load_transformers_model

        model = load_transformers_model(settings, checkpoint)
    model.generate([["Hello!"]])  # warm-up: first-call allocations and kernel choices happen now
    log.info("Loaded %s (%s) in %.1fs", settings.model, model.description, time.monotonic() - started)
    return model
