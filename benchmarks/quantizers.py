"""torch.ao's `quantize_dynamic` against torchao's int8 dynamic quantization.

    python benchmarks/quantizers.py [--smoke]

Needs torchao (`pip install torchao`), which the project does not depend on.
Both quantize the Linear layers of the same fp32 model (int8 weights, int8
dynamic activations); they take turns on the same prompts, best of three.
Prints tokens/s for 1 and 16 conversations, greedy, 32 new tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoint import model_dir  # noqa: E402
from workloads import NEW_TOKENS, prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)

    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from bot.chat_model import default_threads
    from bot.prompt import pad_right
    from bot.transformers_model import quantize_int8

    torch.set_num_threads(default_threads())
    path = model_dir(Path(args.cache), smoke=args.smoke)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32 = AutoModelForSeq2SeqLM.from_pretrained(path, disable_mmap=True).eval().requires_grad_(False)
    contenders = {"torch.ao quantize_dynamic": quantize_int8(copy.deepcopy(fp32))}
    torchao_model = copy.deepcopy(fp32)
    quantize_(torchao_model, Int8DynamicActivationInt8WeightConfig())
    contenders["torchao Int8DynamicActivationInt8Weight"] = torchao_model
    del fp32

    def run(model, size: int) -> float:
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in prompts(size)]
        ids, mask = pad_right(rows, tokenizer.pad_token_id)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=1,
                min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, min_length=0,
            )  # fmt: skip
        return size * NEW_TOKENS / (time.perf_counter() - started)

    for model in contenders.values():
        run(model, 1)  # warm-up
    best = {(name, size): 0.0 for name in contenders for size in (1, 16)}
    for _ in range(3):
        for size in (1, 16):
            for name, model in contenders.items():
                best[name, size] = max(best[name, size], run(model, size))
    print("| quantizer | 1 conversation tokens/s | 16 conversations tokens/s |")
    print("|---|---:|---:|")
    for name in contenders:
        print(f"| {name} | {best[name, 1]:.1f} | {best[name, 16]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
