"""Converting a BlenderBot checkpoint to CTranslate2, once, into a disk cache.

CTranslate2 ships no BlenderBot converter, but its `TransformersConverter`
looks loaders up by the config's class name: we register one per family,
each a subclass of the library's BART loader that says what differs.

The converted model is cached under `BLENDERBOT_CT2_DIR` in a directory named
by what it was made from: the checkpoint (its hub revision, or a hash of a
local directory's files), the quantization, CTranslate2's version and this
converter's own version. A change to any of them converts again; nothing
else does. Processes sharing the cache (replicas on one volume) convert one
target at a time, under a file lock, each in a scratch directory of its own.
Converting needs torch and the full checkpoint (for the 400M model ~5 s and
~2.2 GB of memory); loading a converted model needs neither.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bot.chat_model import ModelLoadError

log = logging.getLogger(__name__)

# Bumped whenever the loaders below change what they write: old conversions are then rebuilt.
CONVERTER_VERSION = 1

# Files a checkpoint is made of; a local directory's hash covers these.
_CHECKPOINT_FILES = re.compile(r".*\.(json|txt|model|safetensors|bin)$")


class ConversionError(RuntimeError):
    """A checkpoint could not be converted; `str(error)` is one line for the operator."""


def checkpoint_id(model: str, directory: Path) -> str:
    """What identifies the checkpoint's content: the commit of a hub snapshot
    (`.../snapshots/<commit>`), else a hash of the directory's files."""
    if directory.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", directory.name):
        return f"{model}@{directory.name}"
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.is_file() and _CHECKPOINT_FILES.fullmatch(p.name)):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return f"sha256:{digest.hexdigest()}"


def converted_dir(cache: Path, model: str, source: str, quantization: str) -> Path:
    """The cache directory for one (checkpoint, quantization, CTranslate2 version)."""
    import ctranslate2

    key = json.dumps(
        {"source": source, "quantization": quantization, "ctranslate2": ctranslate2.__version__,
         "converter": CONVERTER_VERSION},
        sort_keys=True,
    )  # fmt: skip
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or "model")[:60]
    return cache / f"{name}-{quantization}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# What tells one conversion's files from another's: model.bin's inode and modification time.
Stamp = tuple[int, int]


def conversion_stamp(target: Path) -> Stamp | None:
    """The stamp of the conversion in `target`, None if it has no model.bin."""
    try:
        status = (target / "model.bin").stat()
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns


def ensure_converted(
    model: str,
    source: str,
    cache: Path,
    quantization: str,
    fetch_checkpoint: Callable[[], Path],
    damaged: Stamp | None = None,
) -> Path:
    """The converted model of `model` whose content is `source` (`checkpoint_id`),
    converting it first if the cache does not have it yet: `fetch_checkpoint()`
    then gives the directory holding the full checkpoint. `damaged` is the
    `conversion_stamp` of a cached conversion that failed to load: it is built
    again unless another process has rebuilt it meanwhile.

    Processes sharing the cache (replicas on one volume) convert one target at a
    time, under a file lock next to it; the others wait and then reuse it. Each
    conversion writes into its own scratch directory, made and removed under the
    lock, so a scratch directory whose lock is free is a dead conversion's and is
    removed here."""
    target = converted_dir(cache, model, source, quantization)
    try:
        if cache.is_dir():
            _remove_stale_scratch(cache)
        if damaged is None and (target / "model.bin").is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(target):
            if (target / "model.bin").is_file() and conversion_stamp(target) != damaged:
                return target  # converted (or rebuilt) by another process while this one waited
            return _convert_locked(model, target, quantization, fetch_checkpoint)
    except (ConversionError, ModelLoadError):
        raise
    except Exception as error:  # torch, transformers, CTranslate2 and the file system raise many kinds
        raise ConversionError(f"could not convert {model} for CTranslate2: {_first_line(error)}") from error


def _convert_locked(model: str, target: Path, quantization: str, fetch_checkpoint: Callable[[], Path]) -> Path:
    """Convert into `target` while holding its lock: in a scratch directory of
    this conversion's own, moved into place when complete (a half-written
    conversion never looks finished), the scratch directory removed after."""
    log.info("Converting %s for CTranslate2 (%s) into %s; this happens once", model, quantization, target)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}{_SCRATCH}", dir=target.parent))
    try:
        if target.exists():  # damaged or incomplete: removed with the scratch directory
            target.rename(scratch / "replaced")
        output = scratch / "model"
        convert(fetch_checkpoint(), output, quantization)
        output.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("Converted %s for CTranslate2 in %.1fs", model, time.monotonic() - started)
    return target


# Scratch directories are named `<target>.building-<unique>`; ones named after a
# process id (`.building-<pid>`), left by earlier versions, match too.
_SCRATCH = ".building-"


def _lock_path(cache: Path, target_name: str) -> Path:
    return cache / f"{target_name}.lock"


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold the lock on converting into `target`, waiting (with a log line) while
    another process holds it. An OS lock (flock): the kernel releases it when its
    holder dies, however it dies."""
    from filelock import FileLock, Timeout

    lock = FileLock(_lock_path(target.parent, target.name))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("Waiting for another process converting into %s", target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_stale_scratch(cache: Path) -> None:
    """Remove the scratch directories of conversions that died (killed, out of
    memory): those whose target's lock nobody holds. One held by a live
    conversion is left alone."""
    from filelock import FileLock, Timeout

    leftovers: dict[str, list[Path]] = {}
    for path in cache.iterdir():
        if _SCRATCH in path.name and path.is_dir():
            leftovers.setdefault(path.name.rsplit(_SCRATCH, 1)[0], []).append(path)
    for target_name, paths in leftovers.items():
        lock = FileLock(_lock_path(cache, target_name))
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue  # a live conversion of that target: its directory is its own
        except OSError as error:  # a read-only cache, say: tidying up must not stop a start
            log.warning("Could not check %s for a live conversion (%s); leaving it", paths[0], _first_line(error))
            continue
        try:
            for path in paths:
                log.info("Removing %s, left by a conversion that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()


def convert(checkpoint: Path, output: Path, quantization: str) -> None:
    """Convert the checkpoint in `checkpoint` into `output` (which must not exist)."""
    import torch
    from ctranslate2.converters import TransformersConverter

    _register_loaders()
    threads = torch.get_num_threads()
    try:
        TransformersConverter(str(checkpoint)).convert(str(output), quantization=quantization)
    finally:
        torch.set_num_threads(threads)  # loading a model may change it


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@functools.cache
def _register_loaders() -> None:
    """Register our loaders with CTranslate2's converter, once, when first needed."""
    from ctranslate2.converters.transformers import BartLoader, register_loader
    from ctranslate2.specs import transformer_spec

    class BlenderbotLoader(BartLoader):
        """BlenderBot 400M/1B/3B: pre-norm with a final layer norm in encoder and
        decoder, no layer norm on the embeddings, positions without BART's offset.
        Set explicitly: current BlenderbotConfig objects no longer carry the
        legacy `normalize_before` / `normalize_embedding` attributes."""

        pre_norm = True

        @property
        def architecture_name(self) -> str:
            return "BlenderbotForConditionalGeneration"

        def get_model_spec(self, model):
            config = model.config
            activation = _activation(config.activation_function)
            encoder = transformer_spec.TransformerEncoderSpec(
                config.encoder_layers, config.encoder_attention_heads, pre_norm=self.pre_norm,
                activation=activation, layernorm_embedding=not self.pre_norm,
            )  # fmt: skip
            decoder = transformer_spec.TransformerDecoderSpec(
                config.decoder_layers, config.decoder_attention_heads, pre_norm=self.pre_norm, activation=activation
            )
            spec = transformer_spec.TransformerSpec(encoder, decoder)
            self.set_encoder(spec.encoder, model.model.encoder)
            self.set_decoder(spec.decoder, model.model.decoder)
            self.set_linear(spec.decoder.projection, model.lm_head)
            bias = getattr(model, "final_logits_bias", None)
            if bias is not None and bias.nonzero().numel() != 0:
                spec.decoder.projection.bias = bias.squeeze()
            return spec

        def get_vocabulary(self, model, tokenizer):
            """Token strings in id order, exactly `vocab_size` of them: ids the
            tokenizer has no string for get a unique placeholder, so every id
            the model can produce maps to one string and back."""
            tokens = [f"<ct2_unused_{i}>" for i in range(model.config.vocab_size)]
            for token, index in tokenizer.get_vocab().items():
                if index < len(tokens):
                    tokens[index] = token
            return tokens

    class BlenderbotSmallLoader(BlenderbotLoader):
        """BlenderBot-small (90M): post-norm, a layer norm on the embeddings. Its
        encoder normalises after adding positions (what the spec does); its
        decoder normalises the token embedding before adding positions, which the
        spec cannot say. A layer norm acts on each token alone, so it folds
        exactly into the decoder's embedding table: each row becomes what the
        decoder computes for that token, while the output projection keeps the
        raw tied embedding."""

        pre_norm = False

        @property
        def architecture_name(self) -> str:
            return "BlenderbotSmallForConditionalGeneration"

        def set_decoder(self, spec, decoder):
            super().set_decoder(spec, decoder)
            spec.embeddings.weight = _decoder_token_embeddings(decoder)
            spec.scale_embeddings = False  # the scale, where transformers applies one, is in the table

        def set_common_layers(self, spec, module):
            if hasattr(spec, "layernorm_embedding"):
                super().set_common_layers(spec, module)
                return
            # The decoder: positions and embeddings only (the table is replaced above).
            self.set_position_encodings(spec.position_encodings, module.embed_positions)
            self.set_embeddings(spec.embeddings, module.embed_tokens)

    register_loader("BlenderbotConfig")(BlenderbotLoader)
    register_loader("BlenderbotSmallConfig")(BlenderbotSmallLoader)


def _activation(name: str):
    from ctranslate2.converters.transformers import _SUPPORTED_ACTIVATIONS

    if name not in _SUPPORTED_ACTIVATIONS:
        raise ConversionError(f"CTranslate2 has no activation {name!r}")
    return _SUPPORTED_ACTIVATIONS[name]


def _decoder_token_embeddings(decoder):
    """What BlenderBot-small's decoder makes of every token before adding its
    position, computed by the decoder's own modules (so whatever scaling the
    installed transformers applies is reproduced): `layernorm_embedding`'s output
    for the inputs `embed_tokens` gives it, captured with a forward hook."""
    import torch

    captured: list[torch.Tensor] = []

    class _Stop(Exception):
        pass

    def hook(module, inputs, output):
        captured.append(output.detach().clone())
        raise _Stop

    vocab = decoder.embed_tokens.num_embeddings
    handle = decoder.layernorm_embedding.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, vocab, 4096):
                ids = torch.arange(start, min(vocab, start + 4096)).unsqueeze(1)
                try:
                    decoder(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    table = torch.cat([rows.squeeze(1) for rows in captured])
    if table.shape != decoder.embed_tokens.weight.shape:
        raise ConversionError("could not read BlenderBot-small's decoder embeddings")
    return table
