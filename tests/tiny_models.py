"""Tiny random BlenderBot models of both families, saved like hub checkpoints.

Nothing here downloads anything: the byte-level BPE tokenizer is trained
in-process with the `tokenizers` library, the BlenderBot-small one gets a
character vocabulary, and both are saved with `save_pretrained` so the engine
loads them through the same `from_pretrained` path a hub id takes.
Also used by `benchmarks/` (`--smoke`) and by subprocess tests.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

CORPUS = [
    "hello there, how are you doing today?",
    "i am fine thank you. what do you like to do for fun?",
    "i like to read books and play the guitar with my friends.",
    "do you have any pets? i have a dog named max and a cat.",
    "the weather is nice today, let us go for a walk in the park!",
    "what is your favourite food? mine is pizza with lots of cheese.",
    "Tell me something interesting about the ocean and the stars.",
    "0123456789 @everyone <@123> emoji 🙂 ¿qué tal? שלום",
]


def build_blenderbot(directory: Path, *, max_positions: int = 128, seed: int = 0, **config: int) -> Path:
    """A tiny `blenderbot` checkpoint (byte-level BPE, `max_positions` positions)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration, BlenderbotTokenizer

    trainer = ByteLevelBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator(
        CORPUS * 20, vocab_size=400, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    )
    model_json = json.loads(trainer._tokenizer.to_str())["model"]
    tokenizer = BlenderbotTokenizer(vocab=model_json["vocab"], merges=[tuple(m) for m in model_json["merges"]])
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)

    torch.manual_seed(seed)
    model_config = BlenderbotConfig(
        vocab_size=len(tokenizer),
        d_model=config.get("d_model", 32),
        encoder_layers=config.get("encoder_layers", 1),
        decoder_layers=config.get("decoder_layers", 2),
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=config.get("ffn_dim", 64),
        decoder_ffn_dim=config.get("ffn_dim", 64),
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        forced_eos_token_id=2,
    )
    model = BlenderbotForConditionalGeneration(model_config).eval()
    _set_generation_defaults(model, max_length=24, min_length=4)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_blenderbot_small(directory: Path, *, max_positions: int = 512, seed: int = 0) -> Path:
    """A tiny `blenderbot-small` checkpoint with a character-level vocabulary."""
    import torch
    from transformers import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration, BlenderbotSmallTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 3, "__newln__": 4}
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        for token in (char, char + "@@"):
            vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = BlenderbotSmallTokenizer(directory / "vocab.json", directory / "merges.txt")

    torch.manual_seed(seed)
    model_config = BlenderbotSmallConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        forced_eos_token_id=2,
    )
    model = BlenderbotSmallForConditionalGeneration(model_config).eval()
    _set_generation_defaults(model, max_length=24, min_length=4)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_not_blenderbot(directory: Path) -> Path:
    """A tiny BART checkpoint: a seq2seq model that is not BlenderBot."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _set_generation_defaults(model, *, max_length: int, min_length: int) -> None:
    """Like the hub checkpoints: beam search and length limits in generation_config."""
    generation = model.generation_config
    generation.num_beams = 2
    generation.max_length = max_length
    generation.min_length = min_length
    generation.no_repeat_ngram_size = 3
    generation.length_penalty = 0.65


# The generation defaults of facebook/blenderbot-400M-distill (its generation_config.json).
GENERATION_400M = dict(
    num_beams=10,
    min_length=20,
    max_length=60,
    length_penalty=0.65,
    no_repeat_ngram_size=3,
    encoder_no_repeat_ngram_size=3,
    forced_eos_token_id=2,
)

# Per family: std of Linear weights and biases, std of embeddings, bias of </s> in the
# output: found by trying, so that greedy replies differ between prompts, use many tokens
# and end at lengths between 1 and the maximum (a median near 25 of 59 tokens).
_VARIED = {"blenderbot": (0.3, 1.0, 2.0), "blenderbot-small": (0.4, 1.0, 4.0)}


def build_varied(directory: Path, family: str) -> Path:
    """A tiny checkpoint of `family` whose replies depend on the prompt, with the
    400M checkpoint's generation defaults: for comparing runtimes. At the default
    init (std 0.02) a random model repeats one token whatever it is asked, and a
    comparison of two runtimes on it proves nothing."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    (build_blenderbot if family == "blenderbot" else build_blenderbot_small)(directory)
    model = AutoModelForSeq2SeqLM.from_pretrained(directory)
    linear_std, embedding_std, eos_bias = _VARIED[family]
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, linear_std)
                if module.bias is not None:
                    module.bias.normal_(0, linear_std)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0, embedding_std)
        model.final_logits_bias[0, model.config.eos_token_id] = eos_bias
    for key, value in GENERATION_400M.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(directory)
    return directory


def sample_conversations(count: int, *, seed: int = 0, max_turns: int = 7, max_words: int = 25) -> list[list[str]]:
    """`count` conversations of 1 to `max_turns` turns of random words from CORPUS:
    short ones and ones longer than BlenderBot's 128-token window (which
    bot/prompt.py cuts from the left), the same on every run."""
    import random

    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    return [
        [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) for _ in range(1 + i % max_turns)]
        for i in range(count)
    ]
