"""BlenderBot on transformers (torch): int8 on CPU, half precision on GPU.

What BLENDERBOT_RUNTIME=auto uses on a CUDA GPU, and the fallback when
CTranslate2 cannot serve a checkpoint. `generate` runs on the engine's
inference thread only.
"""

from __future__ import annotations

import gc

import torch

from bot.chat_model import (
    BatchedModel,
    Checkpoint,
    Decoding,
    Generated,
    ModelLoadError,
    decoding_for,
    default_threads,
    load_failure,
    release_free_memory,
)
from bot.config import Settings
from bot.prompt import Family, pad_right


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
    release_free_memory()
    return model


class TransformersModel(BatchedModel):
    """A loaded BlenderBot with its tokenizer and generation settings."""

    def __init__(
        self, model, tokenizer, family: Family, settings: Settings, device: torch.device, quantized: bool = False
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.device = device
        self.quantized = quantized
        self.max_positions = int(model.config.max_position_embeddings)
        self.decoding: Decoding = decoding_for(model.generation_config, settings, self.max_positions)
        self.generation_kwargs = _generation_kwargs(self.decoding, settings)
        self.beams = self.decoding.num_beams
        self.max_rows = settings.batch_max_rows
        precision = "int8" if quantized else str(model.dtype).removeprefix("torch.")
        self.description = f"transformers, {family.model_type}, {device.type}, {precision}, {torch.get_num_threads()} threads"

    @torch.inference_mode()
    def _generate(self, rows: list[list[int]], *, sample: bool) -> list[Generated]:
        ids, mask = pad_right(rows, self.tokenizer.pad_token_id)
        kwargs = dict(self.generation_kwargs)
        if sample:  # another decoding, for a second try at an answer
            d = self.decoding
            kwargs.update(do_sample=True, num_beams=1, top_k=d.top_k, top_p=d.top_p, temperature=d.temperature)
        output = self.model.generate(
            input_ids=torch.tensor(ids, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device),
            **kwargs,
        )
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), device=output.device)
        counts = (~torch.isin(output, special)).sum(dim=1).tolist()
        return [Generated(text, int(count), self._reply_ids(row)) for text, count, row in zip(texts, counts, output.tolist())]

    def _reply_ids(self, row: list[int]) -> tuple[int, ...]:
        """The new tokens of one output row: after the decoder start token, up to
        and with the first </s> (the padding after it is not part of the reply)."""
        row = row[1:]
        eos = self.tokenizer.eos_token_id
        return tuple(row[: row.index(eos) + 1] if eos in row else row)


def _generation_kwargs(decoding: Decoding, settings: Settings) -> dict:
    """What `generate` is given on top of the model's own generation_config: the
    length limits (capped), and the beams when a setting overrides them."""
    kwargs = {"max_new_tokens": decoding.max_new_tokens, "min_new_tokens": decoding.min_new_tokens, "min_length": 0}
    if settings.num_beams is not None:
        kwargs["num_beams"] = settings.num_beams
    return kwargs


def load_transformers_model(settings: Settings, checkpoint: Checkpoint) -> TransformersModel:
    """Load the model once, put it in inference mode on the right device, and
    quantize or cast it."""
    from transformers import AutoModelForSeq2SeqLM

    torch.set_num_threads(settings.threads or default_threads())
    device = resolve_device(settings.device)
    quantize = should_quantize(settings.quantize, device)
    try:
        # Memory-mapped weights would keep the whole fp32 checkpoint resident after
        # quantizing (a stray view pins the mapping), so read it into memory instead.
        model = AutoModelForSeq2SeqLM.from_pretrained(
            settings.model, dtype=resolve_dtype(settings.dtype, device), disable_mmap=quantize
        )
    except OSError as error:
        raise ModelLoadError(load_failure(settings.model, error)) from None
    model.eval().requires_grad_(False)
    if quantize:
        model = quantize_int8(model)
    model.to(device)
    return TransformersModel(model, checkpoint.tokenizer, checkpoint.family, settings, device, quantized=quantize)
