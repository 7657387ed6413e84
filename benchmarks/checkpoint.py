"""The benchmark's model: random weights with the exact blenderbot-400M-distill shape.

Speed depends on the shape, not on the weights, so a randomly initialised
model with the hub checkpoint's configuration and a tokenizer with its
vocabulary size measures what the real model would, without a download.
Built once into a cache directory; later runs reuse it.
`--smoke` uses the tiny test model instead (tests/tiny_models.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

VOCAB_SIZE = 8008
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]

# facebook/blenderbot-400M-distill's config.json (BlenderbotConfig's own
# defaults are the 3B model's, so every field that matters is spelled out).
CONFIG_400M = dict(
    vocab_size=VOCAB_SIZE,
    d_model=1280,
    encoder_layers=2,
    decoder_layers=12,
    encoder_attention_heads=32,
    decoder_attention_heads=32,
    encoder_ffn_dim=5120,
    decoder_ffn_dim=5120,
    max_position_embeddings=128,
    activation_function="gelu",
    scale_embedding=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    unk_token_id=3,
    decoder_start_token_id=1,
    forced_eos_token_id=2,
    encoder_no_repeat_ngram_size=3,
    tie_word_embeddings=True,
)
# Its generation defaults (shared/docs/blenderbot.md).
GENERATION_400M = dict(
    num_beams=10,
    min_length=20,
    max_length=60,
    length_penalty=0.65,
    no_repeat_ngram_size=3,
    encoder_no_repeat_ngram_size=3,
    forced_eos_token_id=2,
)


def model_dir(cache: Path, *, smoke: bool) -> Path:
    """The benchmark model's directory under `cache`, built on first use."""
    target = cache / ("tiny-blenderbot" if smoke else "blenderbot-400M-distill-random")
    if (target / "ready").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import build_blenderbot

        build_blenderbot(building)
    else:
        build_400m_distill(building)
    (building / "ready").write_text("built by benchmarks/checkpoint.py\n")
    building.rename(target)  # a half-built directory never looks ready
    return target


def build_400m_distill(directory: Path) -> Path:
    import torch
    from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration

    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    model = BlenderbotForConditionalGeneration(BlenderbotConfig(**CONFIG_400M)).eval()
    for key, value in GENERATION_400M.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_tokenizer():
    """A byte-level BPE tokenizer with exactly 8008 tokens, trained in-process on
    English text that ships with Python (the help topics)."""
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import BlenderbotTokenizer

    trainer = ByteLevelBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator(
        list(topics.values()), vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS
    )
    model_json = json.loads(trainer._tokenizer.to_str())["model"]
    tokenizer = BlenderbotTokenizer(vocab=model_json["vocab"], merges=[tuple(m) for m in model_json["merges"]])
    if len(tokenizer) != VOCAB_SIZE or (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) != (0, 1, 2):
        raise RuntimeError(f"tokenizer came out with {len(tokenizer)} tokens; expected {VOCAB_SIZE}")
    return tokenizer


def decoder_bytes_per_token(config: dict) -> int:
    """Bytes of int8 weights one decoding step reads, from the model's shape: every
    decoder layer except the cross-attention keys and values (computed once per
    reply and cached), plus the output projection, one byte per weight."""
    d, ffn, layers, vocab = config["d_model"], config["decoder_ffn_dim"], config["decoder_layers"], config["vocab_size"]
    per_layer = 4 * d * d + 2 * d * d + 2 * d * ffn  # self-attention q/k/v/out, cross-attention q/out, feed-forward
    return layers * per_layer + vocab * d
