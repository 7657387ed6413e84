"""A message that arrives while another is being answered: two engines side by side.

    python benchmarks/staggered.py --other-engine PATH [--rounds 3] [--beams 1] [--after 0.2] [--then 1,7]

One process, one CTranslate2 model (the 400M shape, int8, two workers of one
thread: the defaults), shared by two `ReplyEngine`s in turns: this checkout's
and the one in `PATH/bot/engine.py` (e.g. a `git archive` of the commit before).
Each round sends a lone full-window message, then `--after` seconds later
`N` more at once (for each N of `--then`), and times every reply. Before
issue 24 the engine ran one batch at a time, so those N waited for the lone
reply to finish while the second worker idled; now they start on it at once.
Prints the median seconds of the lone reply and of the later ones, per engine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoint import model_dir  # noqa: E402
from workloads import NEW_TOKENS, full_window_conversations  # noqa: E402


def engine_class(path: Path | None):
    if path is None:
        from bot.engine import ReplyEngine

        return ReplyEngine
    spec = importlib.util.spec_from_file_location("other_engine", path / "bot" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.ReplyEngine


async def one_round(engine_type, model, settings, conversations, after: float, then: int, tag: str) -> list[float]:
    from bot.memory import open_store

    store = open_store("memory://", max_turns=settings.memory_max_turns, ttl=0)
    engine = engine_type(model, store, settings)
    await engine.start()
    try:
        for i, turns in enumerate(conversations[: then + 1]):
            for user, bot in zip(turns[:-1:2], turns[1::2]):
                await store.append_exchange(f"{tag}-{i}", user, bot)
        started = time.perf_counter()

        async def reply(i: int, delay: float) -> float:
            await asyncio.sleep(delay)
            await engine.reply(f"{tag}-{i}", conversations[i][-1])
            return time.perf_counter() - started - delay

        return list(await asyncio.gather(reply(0, 0.0), *(reply(i, after) for i in range(1, then + 1))))
    finally:
        await engine.close()


async def measure(args: argparse.Namespace) -> None:
    from bot.config import Settings
    from bot.model import load_chat_model

    path = model_dir(Path(args.cache), smoke=args.smoke)
    settings = Settings(
        model=str(path), runtime="ctranslate2", memory_url="memory://", num_beams=args.beams, min_new_tokens=NEW_TOKENS,
        max_new_tokens=NEW_TOKENS, ct2_dir=path.parent / "ctranslate2", rate_limit_per_minute=0,
    )  # fmt: skip
    model = await asyncio.to_thread(load_chat_model, settings)
    settings = replace(settings, memory_ttl=0)
    engines = {"this checkout": engine_class(None), f"{args.other_engine}": engine_class(args.other_engine)}
    counts = [int(n) for n in args.then.split(",")]
    conversations = full_window_conversations(max(counts) + 1)
    await one_round(engines["this checkout"], model, settings, conversations, 0.0, 0, "warm-up")
    results: dict[tuple[str, int], list[list[float]]] = {}
    loads = []
    for round_ in range(args.rounds):
        for then in counts:
            names = list(engines) if round_ % 2 == 0 else list(engines)[::-1]  # alternate who goes first
            for name in names:
                loads.append(os.getloadavg()[0])
                latencies = await one_round(engines[name], model, settings, conversations, args.after, then,
                                            f"r{round_}-{then}-{len(loads)}")  # fmt: skip
                results.setdefault((name, then), []).append(latencies)
    decoding = "greedy" if args.beams == 1 else f"beam {args.beams}"
    print(f"\n{model.description}; {decoding}, full window, {NEW_TOKENS} new tokens; a lone message, then N more "
          f"{args.after:g} s later; median of {args.rounds} rounds; load average {min(loads):.1f}-{max(loads):.1f}\n")
    print("| engine | N | lone reply s | the N later ones: median s | max s |\n|---|---:|---:|---:|---:|")
    for (name, then), rounds in results.items():
        lone = statistics.median(r[0] for r in rounds)
        later = statistics.median(statistics.median(r[1:]) for r in rounds)
        worst = statistics.median(max(r[1:]) for r in rounds)
        print(f"| {name} | {then} | {lone:.2f} | {later:.2f} | {worst:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-engine", type=Path, required=True, help="a checkout whose bot/engine.py to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--after", type=float, default=0.2)
    parser.add_argument("--then", default="1,7")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
