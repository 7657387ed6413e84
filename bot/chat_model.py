"""What every runtime shares, below them all: the `ChatModel` interface the engine
talks to, what a reply is (`Generated`), how replies are decoded (`Decoding`, from
the checkpoint's generation_config and the settings), the checkpoint's small
files (`Checkpoint`), and the helpers both runtimes use. bot/model.py, above the
runtimes, picks and loads one; the runtimes import this module, never that one.

This module imports neither torch nor CTranslate2.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.config import Settings
from bot.prompt import FAMILIES, Family, check_persona, encode_turns

log = logging.getLogger(__name__)


# What `blender-chat download` leaves out of a hub snapshot: weights for other frameworks.
DOWNLOAD_IGNORE = ["*.h5", "*.msgpack", "*.onnx", "tf_*", "flax_*", "rust_*"]

# The tokenizer class AutoTokenizer picks for each family, named so that loading a
# tokenizer does not import torch (AutoTokenizer's module does). In transformers 5
# the *Fast names are the only classes; in 4.x BlenderbotTokenizerFast is what
# AutoTokenizer returns and BlenderBot-small has no fast tokenizer.
TOKENIZER_CLASSES = {"blenderbot": "BlenderbotTokenizerFast", "blenderbot-small": "BlenderbotSmallTokenizer"}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; `str(error)` is one line for the operator."""


@dataclass(frozen=True)
class Generated:
    text: str  # exactly as decoded: BlenderBot replies usually start with a space
    new_tokens: int  # the reply's tokens that are not special tokens
    ids: tuple[int, ...] = ()  # what `text` was decoded from: the new tokens up to and with </s>


class ChatModel(Protocol):
    """What the engine needs of a model: batched replies, one per conversation
    (each a list of turns, oldest first), in order. `beams` is how many rows a
    conversation costs in a batch, so the engine can cap a batch's rows. `personas`,
    when given, holds each conversation's persona facts (bot/prompt.py), in order."""

    beams: int

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]: ...

    def check_persona(self, persona: Sequence[str]) -> None:
        """Raise `bot.prompt.PersonaTooLong` for a persona that leaves the conversation too little room."""


class BatchedModel:
    """What both runtimes' `ChatModel`s share: a conversation's prompt from its turns and
    persona (bot/prompt.py), and a batch cut into calls of at most `max_rows` rows (see
    `rows_per_call`). A runtime sets the attributes below and writes `_generate`, the
    replies of one call."""

    tokenizer: Any
    family: Family
    max_positions: int
    max_rows: int
    beams: int

    def encode(self, turns: Sequence[str], persona: Sequence[str] = ()) -> list[int]:
        return encode_turns(self.tokenizer, self.family, turns, self.max_positions, persona)

    def check_persona(self, persona: Sequence[str]) -> None:
        check_persona(self.tokenizer, self.family, persona, self.max_positions)

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        per_call = rows_per_call(self.max_rows, self.beams, sample)
        personas = personas or [()] * len(conversations)
        sources = [self.encode(turns, persona) for turns, persona in zip(conversations, personas)]
        results: list[Generated] = []
        for start in range(0, len(sources), per_call):
            results += self._generate(sources[start : start + per_call], sample=sample)
            # A call's activations and caches are freed now but glibc would keep the memory
            # (~200 MB for 32 conversations of the 400M model): return it, so the steady-state
            # footprint stays that of the weights. ~15 ms a call.
            release_free_memory()
        return results

    def _generate(self, sources: list[list[int]], *, sample: bool) -> list[Generated]:
        raise NotImplementedError


@dataclass(frozen=True)
class Decoding:
    """How every reply is decoded, with transformers' meaning for each value.
    `sample` replies (the safety filter's second try) decode greedily with
    top-k/top-p sampling instead of beams, with the same length limits and bans."""

    num_beams: int
    min_new_tokens: int
    max_new_tokens: int  # below the decoder's position table
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    forced_eos_token_id: int | None = None
    top_k: int = 50  # sampling, as transformers does by default
    top_p: float = 0.9
    temperature: float = 1.0


def decoding_for(generation_config: Any, settings: Settings, max_positions: int) -> Decoding:
    """The checkpoint's generation_config, with settings overriding it, and the
    number of new tokens capped below the decoder's position table."""

    def value(name: str, default):
        found = getattr(generation_config, name, None)
        return default if found is None else found

    # For encoder-decoder models max_length counts the decoder start token.
    max_new = settings.max_new_tokens or value("max_new_tokens", None) or max(1, value("max_length", 20) - 1)
    max_new = min(max_new, max_positions - 1)
    min_new = settings.min_new_tokens
    if min_new is None:
        min_new = value("min_new_tokens", None)
    if min_new is None:
        min_new = max(0, value("min_length", 0) - 1)
    return Decoding(
        num_beams=settings.num_beams or value("num_beams", 1),
        min_new_tokens=min(min_new, max_new),
        max_new_tokens=max_new,
        length_penalty=float(value("length_penalty", 1.0)),
        no_repeat_ngram_size=value("no_repeat_ngram_size", 0),
        encoder_no_repeat_ngram_size=value("encoder_no_repeat_ngram_size", 0),
        repetition_penalty=float(value("repetition_penalty", 1.0)),
        forced_eos_token_id=value("forced_eos_token_id", None),
        top_k=value("top_k", 50),
    )


@dataclass
class Checkpoint:
    """A BlenderBot checkpoint's small files, read without loading its weights."""

    model: str  # what BLENDERBOT_MODEL says: a hub id or a directory
    directory: Path  # the directory, or the hub snapshot holding its small files
    config: dict
    family: Family
    tokenizer: Any
    generation_config: Any

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings", 512))


def open_checkpoint(model: str) -> Checkpoint:
    """Config, tokenizer and generation_config of `model`; for a hub id they are
    downloaded into the Hugging Face cache (weights only when a runtime needs them)."""
    import transformers
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep transformers' download progress bars, drop its warnings
    directory = Path(model) if os.path.isdir(model) else snapshot(model, ["*.json", "*.txt", "*.model"])
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"Could not load the model {model}: it has no config.json") from None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not load the model {model}: config.json: {_first_line(error)}") from None
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ModelLoadError(
            f"{model} is a {config.get('model_type')!r} model, not BlenderBot; "
            "use a blenderbot or blenderbot-small checkpoint such as facebook/blenderbot-400M-distill"
        )
    try:
        tokenizer = getattr(transformers, TOKENIZER_CLASSES[family.model_type]).from_pretrained(directory)
        if (directory / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(directory)
        else:  # older checkpoints keep their generation defaults in config.json
            generation_config = GenerationConfig.from_dict(config)
    except (OSError, ValueError) as error:
        raise ModelLoadError(load_failure(model, error)) from None
    return Checkpoint(model, directory, config, family, tokenizer, generation_config)


def snapshot(model: str, allow_patterns: list[str] | None = None) -> Path:
    """The hub snapshot of `model` in the Hugging Face cache (downloading what is
    missing, if the hub can be reached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=allow_patterns, ignore_patterns=DOWNLOAD_IGNORE))
    except Exception as error:  # the hub library raises many kinds for network trouble
        raise ModelLoadError(load_failure(model, error)) from None


def download_model(model: str) -> str:
    """Fetch the whole model into the Hugging Face cache; returns the local directory."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, ignore_patterns=DOWNLOAD_IGNORE)
    except Exception as error:  # the hub library raises many kinds for network trouble
        raise ModelLoadError(f"Could not download {model}: {_first_line(error)}") from None


def default_threads() -> int:
    """The cores this process may run on (respects taskset and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def rows_per_call(max_rows: int, beams: int, sample: bool) -> int:
    """Conversations in one generate call: beam search multiplies a batch's rows
    by the beam count, and large beam batches get slower per token and need GBs
    for their caches (benchmarks/README.md). The engine already sends at most
    `max_rows` rows; the runtimes split by this to guard other callers."""
    return max(1, max_rows // (1 if sample else beams))


def release_free_memory() -> None:
    """glibc keeps freed heap memory for reuse; malloc_trim returns it to the OS.
    Called after each batch (a batch of 32 conversations leaves ~0.2-0.5 GB
    behind otherwise) and after quantizing. 1-25 ms."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    return libc


def load_failure(model: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(error).lower()
    if not os.path.isdir(model) and (offline or "connect" in str(error).lower()):
        return (
            f"Could not load the model {model}: it is not in the local Hugging Face cache and could not be "
            "downloaded. Run `blender-chat download` where there is network access, or set BLENDERBOT_MODEL "
            "to a local directory holding the model."
        )
    return f"Could not load the model {model}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
