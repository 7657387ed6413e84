"""CTranslate2 against transformers, as rates: the replies each gives on the same
conversations, fp32, with the checkpoint's own generation options.

    python benchmarks/exactness.py             # the 400M shape, weights scaled (~15-25 min on 2 cores)
    python benchmarks/exactness.py --smoke     # both tiny families of the tests, ~2 min

Random weights at the default init repeat one token whatever they are asked,
so the 400M-shaped model here has its Linear weights drawn with std 0.1 and
the </s> logit raised (like tests/tiny_models.build_varied): replies differ
between prompts and end at varied lengths. Prints, per decoding:
- replies identical to transformers', and to transformers with
  `renormalize_logits=True` (CTranslate2 renormalises after banning tokens);
- replies identical batched (all conversations in one call) and alone;
- on the same conversations followed by the bot's own reply said back to it
  (which the next reply tends to repeat), replies that repeat a trigram of
  their input (encoder_no_repeat_ngram_size), CTranslate2 and transformers,
  and how often CTranslate2 had to decode a conversation again with the
  trigrams banned;
- int8 against fp32 (CTranslate2): mean |log p| difference on the fp32
  replies' tokens, and identical greedy replies.
See benchmarks/README.md ("Exactness").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from checkpoint import GENERATION_400M, model_dir  # noqa: E402
from workloads import full_window_conversations, short_conversations  # noqa: E402


def varied_400m(cache: Path) -> Path:
    """The benchmark's 400M-shaped model with scaled weights, built once."""
    target = cache / "blenderbot-400M-distill-varied"
    if (target / "ready").exists():
        return target
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    source = model_dir(cache, smoke=False)
    model = AutoModelForSeq2SeqLM.from_pretrained(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.1)
        model.final_logits_bias[0, model.config.eos_token_id] = 2.0
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    for key, value in GENERATION_400M.items():
        setattr(model.generation_config, key, value)
    model.generation_config.save_pretrained(target)
    (target / "ready").write_text("built by benchmarks/exactness.py\n")
    return target


def trigram_repeats(model, conversations, replies) -> int:
    repeats = 0
    for turns, reply in zip(conversations, replies):
        source = model.encode(turns)
        banned = {tuple(source[i : i + 3]) for i in range(len(source) - 2)}
        sequence = [1, *reply]
        repeats += bool(banned & {tuple(sequence[i : i + 3]) for i in range(len(sequence) - 3)})
    return repeats


def compare(directory: Path, ct2_dir: Path, conversations: list[list[str]], label: str) -> None:
    from bot.config import Settings
    from bot.model import load_chat_model

    n = len(conversations)
    print(f"\n## {label}: {n} conversations\n")
    print("| decoding | identical to transformers | to transformers, renormalize_logits | batched = alone "
          "| echoed conversations whose reply repeats an input trigram: CTranslate2 / transformers "
          "| echoed conversations decoded again with bans |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    base = Settings(model=str(directory), quantize="none", ct2_dir=ct2_dir)
    for decoding, overrides in [("greedy", {"num_beams": 1}), ("beam 10", {})]:
        ct2 = load_chat_model(replace(base, runtime="ctranslate2", **overrides))
        hf = load_chat_model(replace(base, runtime="transformers", **overrides))
        redone = []
        real_decode = ct2._decode

        def counting(sources, sample, bans=None):
            redone.append(bans is not None)
            return real_decode(sources, sample, bans)

        ours = [ct2.generate([turns])[0].ids for turns in conversations]
        batched = [g.ids for g in ct2.generate(conversations)]
        theirs = [hf.generate([turns])[0].ids for turns in conversations]
        # Conversations ending with the bot's own reply said back to it, which the next reply tends to repeat.
        echo = [[*turns, text, text] for turns in conversations for text in [ct2.generate([turns])[0].text.strip()]]
        ct2._decode = counting
        echoed = [ct2.generate([turns])[0].ids for turns in echo]
        again = sum(redone)
        del ct2._decode
        echoed_hf = [hf.generate([turns])[0].ids for turns in echo]
        hf.generation_kwargs["renormalize_logits"] = True
        renormalized = [hf.generate([turns])[0].ids for turns in conversations]
        print(
            f"| {decoding} | {sum(a == b for a, b in zip(ours, theirs))}/{n} "
            f"| {sum(a == b for a, b in zip(ours, renormalized))}/{n} | {sum(a == b for a, b in zip(ours, batched))}/{n} "
            f"| {trigram_repeats(ct2, echo, echoed)} / {trigram_repeats(hf, echo, echoed_hf)} | {again}/{n} |",
            flush=True,
        )
    fp32 = load_chat_model(replace(base, runtime="ctranslate2", num_beams=1))
    int8 = load_chat_model(replace(base, runtime="ctranslate2", num_beams=1, quantize="int8"))
    replies = [fp32.generate([turns])[0].ids for turns in conversations]
    differences = []
    for turns, reply in zip(conversations, replies):
        source = [fp32.vocabulary[i] for i in fp32.encode(turns)]
        target = [fp32.vocabulary[i] for i in reply[:-1]]
        a, b = (m.translator.score_batch([source], [target])[0].log_probs for m in (fp32, int8))
        differences += [abs(x - y) for x, y in zip(a, b)]
    same = sum(int8.generate([turns])[0].ids == reply for turns, reply in zip(conversations, replies))
    print(f"\nint8 against fp32 (CTranslate2, greedy): mean |log p difference| {sum(differences) / len(differences):.4f} "
          f"per token of the fp32 replies; {same}/{n} greedy replies identical")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--conversations", type=int, default=8, help="of each workload (short and full window)")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(args.cache)
    conversations = short_conversations(args.conversations) + full_window_conversations(args.conversations)
    if args.smoke:
        from tiny_models import build_varied

        for family in ("blenderbot", "blenderbot-small"):
            directory = cache / f"varied-{family}"
            if not (directory / "config.json").exists():
                build_varied(directory, family)
            compare(directory, cache / "ctranslate2", conversations, f"tiny {family}")
    else:
        compare(varied_400m(cache), cache / "ctranslate2", conversations, "400M shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
