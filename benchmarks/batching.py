"""How big a batch should be: tokens/s of one batched `generate` by batch size.

    python benchmarks/batching.py [--smoke] [--runtime auto] [--beams 1,10] [--sizes 1,4,8,16,32]
                                  [--workload full] [--rounds 2]

The engine's model (default settings: CTranslate2 int8 on CPU; `--runtime
transformers` for the other one), the benchmark's conversations
(benchmarks/workloads.py), 32 new tokens. Beam search multiplies the rows of a
batch by the beam count, so the best batch size for beams can be smaller than
for greedy. Sizes take turns within each round; the best of the rounds is
printed, with the peak RSS of the batch and the load average. Used to pick
BATCH_SIZE and BATCH_MAX_ROWS (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoint import model_dir  # noqa: E402
from workloads import NEW_TOKENS, WORKLOADS  # noqa: E402


def peak_rss_during(function) -> tuple[float, int]:
    """Seconds `function()` takes and the highest RSS (sampled every 20 ms) meanwhile."""
    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    function()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return seconds, peak[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--beams", default="1,10")
    parser.add_argument("--sizes", default="1,4,8,16,32")
    parser.add_argument("--workload", default="full", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layout", help="CTranslate2 WORKERSxTHREADS instead of the runtime's (e.g. 1x2, 2x2)")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bot.chat_model import release_free_memory
    from bot.config import Settings
    from bot.model import load_chat_model

    model = model_dir(Path(args.cache), smoke=args.smoke)
    sizes = [int(s) for s in args.sizes.split(",")]
    conversations = WORKLOADS[args.workload](max(sizes))
    base = Settings(
        model=str(model), runtime=args.runtime, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS,
        ct2_dir=model.parent / "ctranslate2", batch_max_rows=10**6,
    )  # fmt: skip
    print("| decoding | batch (conversations) | rows | seconds | tokens/s | peak RSS MB | load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for beams in (int(b) for b in args.beams.split(",")):
        chat_model = load_chat_model(replace(base, num_beams=beams))
        if args.layout and hasattr(chat_model, "translator"):
            import ctranslate2

            workers, threads = (int(n) for n in args.layout.split("x"))
            chat_model.translator = ctranslate2.Translator(str(chat_model.path), compute_type="int8",
                                                           inter_threads=workers, intra_threads=threads)  # fmt: skip
            chat_model.workers = workers  # a batch is split between the workers
            chat_model.description += f" (as {workers} x {threads})"
        best: dict[int, tuple[float, int]] = {}
        for round_ in range(args.rounds):
            for size in sizes if round_ % 2 == 0 else sizes[::-1]:
                release_free_memory()
                seconds, peak = peak_rss_during(lambda: chat_model.generate(conversations[:size]))
                if size not in best or seconds < best[size][0]:
                    best[size] = (seconds, peak)
        decoding = "greedy" if beams == 1 else f"beam {beams}"
        for size in sizes:
            seconds, peak = best[size]
            print(f"| {decoding} | {size} | {size * beams} | {seconds:.2f} | {size * NEW_TOKENS / seconds:.1f} "
                  f"| {peak / 2**20:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)  # fmt: skip
        print(f"({chat_model.description}, {args.workload} conversations, best of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
