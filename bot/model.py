"""BlenderBot: loading once, speeding up for the hardware, and batched generation.

`load_chat_model(settings)` is slow and blocking (seconds to minutes); call it
once at start-up. `ChatModel.generate` is blocking too and is only ever run on
the engine's inference thread, never on the event loop.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bot.config import Settings
from bot.prompt import FAMILIES, Family, encode_turns, pad_right

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; `str(error)` is one line for the operator."""


@dataclass(frozen=True)
class Generated:
    text: str  # exactly as decoded: BlenderBot replies usually start with a space
    new_tokens: int


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("BLENDERBOT_DEVICE=cuda but no CUDA GPU is available; use auto or cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (int8 quantization is the CPU speed-up); half precision on GPU."""
    if device.type != "cuda":
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, setting)


def should_quantize(setting: str, device: torch.device) -> bool:
    if setting == "int8" and device.type != "cpu":
        raise ModelLoadError("BLENDERBOT_QUANTIZE=int8 works on the CPU only; use auto or none on a GPU")
    return setting == "int8" or (setting == "auto" and device.type == "cpu")


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear layer, in place, so the fp32
    weights are freed rather than kept beside the int8 copies.

    torch.ao's quantize_dynamic rather than torchao: see benchmarks/README.md.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, once per start-up
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    # The replaced fp32 Linear modules sit in reference cycles: free them now
    # rather than at some later collection, and hand the memory back to the OS.
    gc.collect()
    _release_free_memory()
    return model


def _release_free_memory() -> None:
    """glibc keeps freed heap memory for reuse; malloc_trim returns it (the
    fp32 weights freed by quantizing are ~1 GB for the 400M model)."""
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


def default_threads() -> int:
    """The cores this process may run on (respects taskset and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ChatModel:
    """A loaded BlenderBot with its tokenizer and generation settings."""

    def __init__(self, model, tokenizer, family: Family, settings: Settings, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.device = device
        self.quantized = False
        self.max_positions = int(model.config.max_position_embeddings)
        self.generation_kwargs = _generation_kwargs(model.generation_config, settings, self.max_positions)
        self.beams = int(self.generation_kwargs.get("num_beams") or model.generation_config.num_beams or 1)
        self.max_rows = settings.batch_max_rows

    def encode(self, turns: Sequence[str]) -> list[int]:
        return encode_turns(self.tokenizer, self.family, turns, self.max_positions)

    def generate(self, conversations: Sequence[Sequence[str]], *, sample: bool = False) -> list[Generated]:
        """Batched generation for several conversations (each a list of turns), in
        as few `generate` calls as `max_rows` allows. Beam search multiplies a
        batch's rows by the beam count, and large beam batches get slower per
        token and need GBs for their caches (benchmarks/README.md). The engine
        already sends at most `max_rows` rows; this guards other callers."""
        per_call = max(1, self.max_rows // (1 if sample else self.beams))
        results: list[Generated] = []
        for start in range(0, len(conversations), per_call):
            results += self._generate(conversations[start : start + per_call], sample=sample)
        return results

    @torch.inference_mode()
    def _generate(self, conversations: Sequence[Sequence[str]], *, sample: bool) -> list[Generated]:
        rows = [self.encode(turns) for turns in conversations]
        ids, mask = pad_right(rows, self.tokenizer.pad_token_id)
        kwargs = dict(self.generation_kwargs)
        if sample:  # another decoding, for a second try at an answer
            kwargs.update(do_sample=True, num_beams=1, top_p=0.9, temperature=1.0)
        output = self.model.generate(
            input_ids=torch.tensor(ids, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            **kwargs,
        )
        # A batch's activations and caches are freed now but glibc would keep the
        # memory (~200 MB for 32 conversations of the 400M model): return it, so
        # the steady-state footprint stays that of the weights. ~15 ms a batch.
        _release_free_memory()
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), device=output.device)
        counts = (~torch.isin(output, special)).sum(dim=1).tolist()
        return [Generated(text, int(count)) for text, count in zip(texts, counts)]


def _generation_kwargs(generation_config, settings: Settings, max_positions: int) -> dict:
    """The checkpoint's generation_config, with settings overriding it, and the
    number of new tokens capped below the decoder's position table."""
    # For encoder-decoder models max_length counts the decoder start token.
    max_new = settings.max_new_tokens or max(1, (generation_config.max_length or 21) - 1)
    max_new = min(max_new, max_positions - 1)
    min_new = settings.min_new_tokens
    if min_new is None:
        min_new = max(0, (generation_config.min_length or 0) - 1)
    kwargs = {"max_new_tokens": max_new, "min_new_tokens": min(min_new, max_new), "min_length": 0}
    if settings.num_beams is not None:
        kwargs["num_beams"] = settings.num_beams
    return kwargs


def load_chat_model(settings: Settings) -> ChatModel:
    """Load tokenizer and model once, put them in inference mode on the right
    device, quantize or cast them, and warm them up with one short generation."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(settings.threads or default_threads())
    device = resolve_device(settings.device)
    started = time.monotonic()
    hf_logging.set_verbosity_error()  # keep transformers' download progress bars, drop its warnings
    try:
        config = AutoConfig.from_pretrained(settings.model)
    except (OSError, ValueError) as error:  # ValueError: a directory without a usable config.json
        raise ModelLoadError(_load_failure(settings.model, error)) from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelLoadError(
            f"{settings.model} is a {config.model_type!r} model, not BlenderBot; "
            "use a blenderbot or blenderbot-small checkpoint such as facebook/blenderbot-400M-distill"
        )
    quantize = should_quantize(settings.quantize, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        # Memory-mapped weights would keep the whole fp32 checkpoint resident after
        # quantizing (a stray view pins the mapping), so read it into memory instead.
        model = AutoModelForSeq2SeqLM.from_pretrained(
            settings.model, dtype=resolve_dtype(settings.dtype, device), disable_mmap=quantize
        )
    except OSError as error:
        raise ModelLoadError(_load_failure(settings.model, error)) from None
    model.eval().requires_grad_(False)
    if quantize:
        model = quantize_int8(model)
    model.to(device)
    chat_model = ChatModel(model, tokenizer, family, settings, device)
    chat_model.quantized = quantize
    chat_model.generate([["Hello!"]])  # warm-up: first-call allocations and kernel choices happen now
    log.info(
        "Loaded %s (%s, %s%s, %d threads) in %.1fs",
        settings.model,
        family.model_type,
        device.type,
        ", int8" if quantize else f", {str(model.dtype).removeprefix('torch.')}",
        torch.get_num_threads(),
        time.monotonic() - started,
    )
    return chat_model


def _load_failure(model: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(error).lower()
    if not os.path.isdir(model) and (offline or "connect" in str(error).lower()):
        return (
            f"Could not load the model {model}: it is not in the local Hugging Face cache and could not be "
            "downloaded. Run `blender-chat download` where there is network access, or set BLENDERBOT_MODEL "
            "to a local directory holding the model."
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"Could not load the model {model}: {first_line}"


def download_model(model: str) -> str:
    """Fetch the model into the Hugging Face cache; returns the local directory."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "tf_*", "flax_*", "rust_*"])
    except Exception as error:  # the hub library raises many kinds for network trouble
        raise ModelLoadError(f"Could not download {model}: {str(error).splitlines()[0]}") from None
