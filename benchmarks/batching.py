"""How big a batch should be: tokens/s of one batched `generate` by batch size.

    python benchmarks/batching.py [--smoke] [--beams 1,10] [--sizes 1,4,8,16,32]

The engine's model (int8 on CPU, default settings), the benchmark's prompts,
32 new tokens. Beam search multiplies the rows of a batch by the beam count,
so the best batch size for beams can be smaller than for greedy. Used to pick
BATCH_SIZE (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import prompts  # noqa: E402
from checkpoint import model_dir  # noqa: E402
from contenders import NEW_TOKENS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--beams", default="1,10")
    parser.add_argument("--sizes", default="1,4,8,16,32")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)

    from bot.config import Settings
    from bot.model import load_chat_model

    model = model_dir(Path(args.cache), smoke=args.smoke)
    sizes = [int(s) for s in args.sizes.split(",")]
    batch = prompts(max(sizes))
    print("| decoding | batch (conversations) | rows | seconds | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for beams in (int(b) for b in args.beams.split(",")):
        settings = Settings(model=str(model), num_beams=beams, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)
        chat_model = load_chat_model(settings)
        for size in sizes:
            started = time.perf_counter()
            chat_model.generate([[p] for p in batch[:size]])
            seconds = time.perf_counter() - started
            decoding = "greedy" if beams == 1 else f"beam {beams}"
            print(f"| {decoding} | {size} | {size * beams} | {seconds:.2f} | {size * NEW_TOKENS / seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
