"""BlenderBot on CTranslate2: the same replies as transformers, faster in batches.

The checkpoint is converted once (bot/ct2_convert.py) and loaded with
`ctranslate2.Translator`. Input ids come from bot/prompt.py as for
transformers; they cross into CTranslate2 as the converted vocabulary's token
strings (one per id) and come back as ids.

Every option of the checkpoint's generation_config keeps transformers' meaning
(`Decoding`). Most are `translate_batch` options (beams, length limits, length
penalty, no-repeat n-grams, repetition penalty, top-k/top-p sampling); two
have no option and are built here:

- `forced_eos_token_id`: transformers forces `</s>` as the last possible token.
  We decode one token less, append `</s>` where a hypothesis did not end, and
  rank hypotheses by transformers' score (the forced token adds no log
  probability but one to the length the length penalty divides by).
- `encoder_no_repeat_ngram_size` (3 in the 400M/1B/3B checkpoints: a reply may
  not repeat a trigram of its conversation). CTranslate2's `suppress_sequences`
  bans sequences for a whole call, for every conversation in it. So the search
  bans nothing; each conversation takes its best hypothesis (of all the beams)
  that repeats none of its own input trigrams, and one whose hypotheses all do
  is decoded again alone with its trigrams banned. Every reply depends on its
  own conversation only, as with transformers, and none repeats an input
  trigram. (CTranslate2's history has no decoder start token, so in that second
  decoding a trigram beginning with it, the first two tokens of an earlier
  turn, is banned as a pair anywhere in the reply.)

Not reproduced: CTranslate2 renormalises probabilities after banning tokens and
stops a beam search once `num_beams` hypotheses finished; transformers does
neither, so beam replies are those of transformers with `renormalize_logits=True`
except near-ties. And its no-repeat history lacks the decoder start token, which
matters only to a model that generates that token itself (measured in
tests/test_ct2_exactness.py and benchmarks/exactness.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.chat_model import (
    BatchedModel,
    Checkpoint,
    Decoding,
    Generated,
    ModelLoadError,
    decoding_for,
    default_threads,
    snapshot,
)
from bot.config import Settings
from bot.ct2_convert import ConversionError, Stamp, checkpoint_id, conversion_stamp, ensure_converted
from bot.prompt import Family

log = logging.getLogger(__name__)

# generation_config options CTranslate2 cannot honour, with the value that means "off".
UNSUPPORTED_OPTIONS = {
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "renormalize_logits": False,
    "do_sample": False,
}


class CTranslate2Unavailable(Exception):
    """CTranslate2 cannot serve this checkpoint here; `str(error)` says why in one line."""


@dataclass
class Hypothesis:
    ids: list[int]  # the reply's ids, ending with </s> unless it ran out of length
    score: float  # transformers' beam score: sum of log probabilities / length ** length_penalty
    forced_end: bool  # </s> was appended (forced_eos_token_id), not decoded


class CTranslate2Model(BatchedModel):
    def __init__(
        self,
        translator,
        path: Path,
        vocabulary: list[str],
        checkpoint: Checkpoint,
        settings: Settings,
        description: str,
        workers: int = 1,
    ) -> None:
        self.translator = translator
        self.workers = workers  # the translator's parallel workers: a batch is split between them
        self.path = path  # the converted model
        self.vocabulary = vocabulary
        self.index = {token: i for i, token in enumerate(vocabulary)}
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config  # the checkpoint's config.json
        self.family: Family = checkpoint.family
        self.max_positions = checkpoint.max_positions
        self.decoding: Decoding = decoding_for(checkpoint.generation_config, settings, self.max_positions)
        self.beams = self.decoding.num_beams
        self.max_rows = settings.batch_max_rows
        self.eos = self.tokenizer.eos_token_id
        self.start = int(checkpoint.config.get("decoder_start_token_id", self.tokenizer.bos_token_id))
        self.special = set(self.tokenizer.all_special_ids)
        self.description = description

    def _generate(self, sources: list[list[int]], *, sample: bool) -> list[Generated]:
        replies = []
        for source, hypotheses in zip(sources, self._decode(sources, sample)):
            best = self._best_clean(source, hypotheses)
            if best is None:  # every hypothesis repeats an input n-gram: again alone, with them banned
                hypotheses = self._decode([source], sample, bans=self._bans(source))[0]
                best = self._best_clean(source, hypotheses) or hypotheses[0]
            replies.append(self._generated(best.ids))
        return replies

    def _decode(
        self, sources: list[list[int]], sample: bool, bans: list[list[str]] | None = None
    ) -> list[list[Hypothesis]]:
        """Every hypothesis CTranslate2 finished for each source, best first by transformers' score."""
        d = self.decoding
        forced = d.forced_eos_token_id is not None
        length = d.max_new_tokens - 1 if forced else d.max_new_tokens
        if length < 1:  # only room for the forced </s>
            return [[Hypothesis([self.eos], 0.0, True)] for _ in sources]
        beams = 1 if sample else d.num_beams
        options = dict(
            beam_size=beams,
            num_hypotheses=beams,
            length_penalty=d.length_penalty,
            no_repeat_ngram_size=d.no_repeat_ngram_size,
            repetition_penalty=d.repetition_penalty,
            min_decoding_length=min(d.min_new_tokens, length),
            max_decoding_length=length,
            return_end_token=True,  # </s> counts in the length, as in transformers
            return_scores=True,
            max_input_length=0,  # bot/prompt.py already truncated, from the left
            # Each worker decodes its share of the batch on its own core (see `thread_split`).
            max_batch_size=-(-len(sources) // self.workers) if self.workers > 1 else 0,
        )
        if sample:
            options.update(sampling_topk=d.top_k, sampling_topp=d.top_p, sampling_temperature=d.temperature)
        if bans:
            options["suppress_sequences"] = bans
        results = self.translator.translate_batch([[self.vocabulary[i] for i in s] for s in sources], **options)
        decoded = []
        for result in results:
            hypotheses = [self._hypothesis(tokens, score, forced) for tokens, score in zip(result.hypotheses, result.scores)]
            decoded.append(sorted(hypotheses, key=lambda h: h.score, reverse=True))
        return decoded

    def _hypothesis(self, tokens: list[str], score: float, forced: bool) -> Hypothesis:
        ids = [self.index[token] for token in tokens]
        penalty = self.decoding.length_penalty
        log_probability = score * len(ids) ** penalty if ids else 0.0  # CTranslate2 divided by its length
        appended = forced and (not ids or ids[-1] != self.eos)
        if appended:
            ids.append(self.eos)
        return Hypothesis(ids, log_probability / len(ids) ** penalty if ids else float("-inf"), appended)

    def _bans(self, source: list[int]) -> list[list[str]]:
        """`suppress_sequences` for one conversation: its input n-grams. One that
        starts with the decoder start token (which CTranslate2's history lacks) is
        banned as the rest of it, anywhere: stricter than transformers, never looser."""
        n = self.decoding.encoder_no_repeat_ngram_size
        bans = set()
        for gram in _ngrams(source, n):
            bans.add(gram[1:] if gram[0] == self.start else gram)
        return [[self.vocabulary[i] for i in gram] for gram in sorted(bans)]

    def _best_clean(self, source: list[int], hypotheses: list[Hypothesis]) -> Hypothesis | None:
        """The best hypothesis that repeats no n-gram of the input (transformers'
        encoder_no_repeat_ngram_size), counting the decoder start token as
        transformers does; a forced last </s> is exempt, as transformers forces it
        over the ban."""
        n = self.decoding.encoder_no_repeat_ngram_size
        if n <= 0:
            return hypotheses[0] if hypotheses else None
        banned = set(_ngrams(source, n))
        for hypothesis in hypotheses:
            grams = _ngrams([self.start] + hypothesis.ids, n)
            if hypothesis.forced_end:
                grams = grams[:-1]
            if banned.isdisjoint(grams):
                return hypothesis
        return None

    def _generated(self, ids: list[int]) -> Generated:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return Generated(text, sum(1 for i in ids if i not in self.special), tuple(ids))


def _ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)] if n > 0 else []


def unsupported_option(generation_config) -> str | None:
    """The first generation_config option CTranslate2 cannot honour, as `name=value`."""
    for name, off in UNSUPPORTED_OPTIONS.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != off:
            return f"{name}={value!r}"
    forced = getattr(generation_config, "forced_eos_token_id", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if forced is not None and eos is not None and forced != eos:
        return f"forced_eos_token_id={forced!r} (not the end token)"
    return None


def precision(settings: Settings, device: str) -> tuple[str, str]:
    """(how the converted weights are stored, CTranslate2's compute type) for
    BLENDERBOT_QUANTIZE and BLENDERBOT_DTYPE: int8 on CPU unless `none`; the GPU
    dtype otherwise."""
    import ctranslate2

    if device == "cpu":
        return ("float32", "float32") if settings.quantize == "none" else ("int8", "int8")
    if settings.quantize == "int8":  # as on transformers: one meaning for the setting
        raise ModelLoadError("BLENDERBOT_QUANTIZE=int8 works on the CPU only; use auto or none on a GPU")
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if "bfloat16" in ctranslate2.get_supported_compute_types("cuda") else "float16"
    return dtype, dtype


def thread_split(threads: int) -> tuple[int, int]:
    """(workers, threads per worker) for BLENDERBOT_THREADS cores. Measured on 2
    quiet cores (benchmarks/README.md, "The thread layout on the quiet machine"):
    one thread per reply is faster for a lone reply than two sharing it (greedy
    0.82 against 0.90 s, beam 10 1.17 against 1.60 s, full window), and a batch
    split between two single-threaded workers is faster than one two-threaded
    worker. Two workers at most: more would each read all the weights every step;
    larger machines give the rest of the cores to each worker (BLENDERBOT_THREADS=4
    on 2 cores: two workers of two threads, for bursts at the lone reply's cost)."""
    workers = 2 if threads >= 2 else 1
    return workers, max(1, threads // workers)


def resolve_device(setting: str) -> str:
    import ctranslate2

    cuda = ctranslate2.get_cuda_device_count() > 0
    if setting == "cuda" and not cuda:
        raise CTranslate2Unavailable("BLENDERBOT_DEVICE=cuda but CTranslate2 finds no CUDA GPU")
    return "cuda" if setting == "cuda" or (setting == "auto" and cuda) else "cpu"


def converted_model(
    settings: Settings, checkpoint: Checkpoint, device: str = "cpu", damaged: Stamp | None = None
) -> Path:
    """The converted model for these settings, converting the checkpoint first if
    the cache does not have it (for a hub id, its weights are fetched then), or
    again if the cached one is the `damaged` conversion."""
    quantization, _ = precision(settings, device)
    local = checkpoint.directory if Path(checkpoint.model).is_dir() else None
    try:
        return ensure_converted(
            checkpoint.model,
            checkpoint_id(checkpoint.model, checkpoint.directory),
            settings.ct2_dir,
            quantization,
            lambda: local or snapshot(checkpoint.model),
            damaged,
        )
    except ConversionError as error:
        raise CTranslate2Unavailable(str(error)) from None


def load_ct2_model(settings: Settings, checkpoint: Checkpoint) -> CTranslate2Model:
    """Convert (once) and load the checkpoint; `CTranslate2Unavailable` if this
    cannot work, for the caller to fall back or stop."""
    try:
        import ctranslate2
    except ImportError as error:
        raise CTranslate2Unavailable(f"the ctranslate2 package cannot be imported ({error})") from None
    option = unsupported_option(checkpoint.generation_config)
    if option:
        raise CTranslate2Unavailable(f"it cannot honour the checkpoint's generation option {option}")
    device = resolve_device(settings.device)
    _, compute_type = precision(settings, device)
    threads = settings.threads or default_threads()
    workers, per_worker = thread_split(threads) if device == "cpu" else (1, threads)

    def translator(path: Path):
        return ctranslate2.Translator(
            str(path), device=device, compute_type=compute_type, inter_threads=workers, intra_threads=per_worker
        )

    path = converted_model(settings, checkpoint, device)
    stamp = conversion_stamp(path)
    try:
        loaded = translator(path)
    except (RuntimeError, ValueError) as first:
        # A damaged conversion in the cache (a disk filled up...): convert once more, unless
        # another process sharing the cache has done so meanwhile (its stamp then differs).
        log.warning("Could not load the converted model in %s (%s); converting again", path, first)
        path = converted_model(settings, checkpoint, device, damaged=stamp)
        try:
            loaded = translator(path)
        except (RuntimeError, ValueError) as error:
            raise CTranslate2Unavailable(f"could not load the converted model: {error}") from None
    vocabulary = json.loads((path / "shared_vocabulary.json").read_text(encoding="utf-8"))
    description = (
        f"ctranslate2 {ctranslate2.__version__}, {checkpoint.family.model_type}, {device}, {compute_type}, "
        f"{threads} threads ({workers} x {per_worker})"
    )
    return CTranslate2Model(loaded, path, vocabulary, checkpoint, settings, description, workers)
