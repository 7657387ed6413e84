"""Where a lone reply's time goes: the engine against the model's own call.

    python benchmarks/overhead.py [--smoke] [--runtime auto] [--rounds 7]

One process, default settings (safety on, memory://), 32 new tokens, greedy
and beam 10, a short and a full-window conversation (benchmarks/workloads.py).
Each round times, in turns: the runtime's raw call (CTranslate2's
`translate_batch` or transformers' `generate`, exactly as the runtime makes
it), `ChatModel.generate` (adds tokenizing and decoding), and
`ReplyEngine.reply` (adds everything else), with the engine's stages timed
inside the same replies: the safety checks, the history read and write, and
the wait between queueing a reply and the model starting on it. Prints the
medians. See benchmarks/README.md ("The engine's overhead on a lone reply").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoint import model_dir  # noqa: E402
from workloads import NEW_TOKENS, full_window_conversations, short_conversations  # noqa: E402


class Timed:
    """Wraps a callable (sync or async) and adds each call's seconds to `log[name]`."""

    def __init__(self, log: dict[str, list[float]], name: str, function) -> None:
        self.log, self.name, self.function = log, name, function

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        result = self.function(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return self._await(result, started)
        self.log[self.name].append(time.perf_counter() - started)
        return result

    async def _await(self, coroutine, started: float):
        try:
            return await coroutine
        finally:
            self.log[self.name].append(time.perf_counter() - started)


async def measure(model_path: Path, runtime: str, beams: int, rounds: int) -> dict[str, dict[str, float]]:
    from bot.config import Settings
    from bot.engine import ReplyEngine
    from bot.memory import open_store
    from bot.model import load_chat_model

    settings = Settings(
        model=str(model_path), runtime=runtime, memory_url="memory://", num_beams=beams, min_new_tokens=NEW_TOKENS,
        max_new_tokens=NEW_TOKENS, ct2_dir=model_path.parent / "ctranslate2", rate_limit_per_minute=0,
    )  # fmt: skip
    model = await asyncio.to_thread(load_chat_model, settings)
    log: dict[str, list[float]] = defaultdict(list)
    raw_owner = model.translator if hasattr(model, "translator") else model.model
    raw_name = "translate_batch" if hasattr(model, "translator") else "generate"
    raw = getattr(raw_owner, raw_name)
    if hasattr(model, "translator"):

        class Translator:  # ctranslate2.Translator's methods cannot be replaced on the instance
            translate_batch = Timed(log, "raw call", raw)

        model.translator = Translator()
    else:
        setattr(raw_owner, raw_name, Timed(log, "raw call", raw))
    model.generate = Timed(log, "ChatModel.generate", model.generate)
    store = open_store("memory://", max_turns=settings.memory_max_turns, ttl=0)
    engine = ReplyEngine(model, store, replace(settings, memory_ttl=0))
    await engine.start()
    engine._unsafe = Timed(log, "safety checks", engine._unsafe)
    store.history = Timed(log, "history read", store.history)
    store.append_exchange = Timed(log, "history write", store.append_exchange)
    queued = engine._queue.put_nowait

    def put(request):
        request.queued = time.perf_counter()
        queued(request)

    engine._queue.put_nowait = put
    run_batch = engine._run_batch

    async def timed_batch(loop, group, sample):
        log["queue to model"].append(time.perf_counter() - group[0].queued)
        return await run_batch(loop, group, sample)

    engine._run_batch = timed_batch
    results = {}
    for workload, conversations in [("short", short_conversations(1)), ("full", full_window_conversations(1))]:
        turns = conversations[0]
        for key in list(log):
            log[key].clear()
        rows = defaultdict(list)
        for round_ in range(rounds):
            for step in ("raw", "generate", "engine"):
                log["raw call"].clear()
                started = time.perf_counter()
                if step == "generate":
                    await asyncio.to_thread(model.generate, [turns])
                elif step == "raw":
                    await asyncio.to_thread(model.generate, [turns])  # to time only its raw call
                else:
                    conversation = f"c{round_}-{workload}"
                    history = list(zip(turns[:-1:2], turns[1::2]))
                    for user, bot in history:
                        await store.append_exchange(conversation, user, bot)
                    for key in ("history write", "safety checks", "history read", "queue to model"):
                        log[key].clear()
                    await engine.reply(conversation, turns[-1])
                total = time.perf_counter() - started
                if step == "raw":
                    rows["raw call"].append(sum(log["raw call"]))
                elif step == "generate":
                    rows["ChatModel.generate"].append(total)
                else:
                    rows["engine.reply"].append(total)
                    rows["  raw call inside it"].append(sum(log["raw call"]))
                    for key in ("safety checks", "history read", "history write", "queue to model"):
                        rows["  " + key].append(sum(log[key]))
        results[workload] = {key: statistics.median(values) for key, values in rows.items()}
    await engine.close()
    results["description"] = model.description
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--beams", default="1,10")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_dir(Path(args.cache), smoke=args.smoke)
    for beams in (int(b) for b in args.beams.split(",")):
        results = asyncio.run(measure(path, args.runtime, beams, args.rounds))
        decoding = "greedy" if beams == 1 else f"beam {beams}"
        print(f"\n{results.pop('description')}, {decoding}, {args.rounds} rounds, median seconds, "
              f"load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
        print("| | short | full window |")
        print("|---|---:|---:|")
        for key in results["short"]:
            print(f"| {key} | {results['short'][key]:.3f} | {results['full'][key]:.3f} |")
        for workload in ("short", "full"):
            r = results[workload]
            print(f"engine overhead ({workload}): {r['engine.reply'] - r['raw call']:.3f}s = "
                  f"{(r['engine.reply'] - r['raw call']) / r['raw call']:.0%} of the raw call")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
