"""Where one decoding step of a lone reply goes, on CTranslate2 (issue 24, item 1).

    python benchmarks/profile_step.py [--rounds 5] [--perf] [--threads 1,2]

One process, the 400M shape converted to int8 (benchmarks/checkpoint.py, the
bench's cache), one full-window conversation, greedy, on one worker of one
thread (where a lone reply runs with the defaults) and, in turns with it, on
one worker of each other count in `--threads` (would two threads on its GEMMs
help?).
Measured in wall and CPU seconds of the process (other programs on the
machine inflate CPU seconds far less than wall seconds):

- a reply of 1 new token against one of 32 (min = max): their difference / 31
  is one decoding step; the first is the encoder plus the call's fixed costs;
- `ChatModel.generate` against its raw `translate_batch` call: the Python
  around it (tokenizing, the no-repeat check, decoding the text);
- with `--perf`, `perf record -e cpu-clock` attached to this process during
  the 32-token replies only: the step's samples by shared object and symbol
  (the int8 GEMMs in kernels oneDNN or MKL generate at run time, shown as
  [JIT]; the rest of CTranslate2; Python).

Results are recorded in benchmarks/README.md ("Where a lone reply's decoding
step goes").
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoint import model_dir  # noqa: E402
from workloads import NEW_TOKENS, full_window_conversations  # noqa: E402


def timed(function) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU counts every thread of the process."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1", help="intra-op thread counts to take turns, e.g. 1,2 (default 1)")
    parser.add_argument("--perf", action="store_true", help="perf record the 32-token replies (needs perf)")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ctranslate2

    from bot.config import Settings
    from bot.model import load_chat_model

    path = model_dir(Path(args.cache), smoke=False)
    settings = Settings(
        model=str(path), runtime="ctranslate2", num_beams=1, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS,
        ct2_dir=path.parent / "ctranslate2", threads=1,
    )  # fmt: skip
    model = load_chat_model(settings)  # one worker of one thread
    translators = {1: model.translator}
    for threads in (int(t) for t in args.threads.split(",")):
        if threads not in translators:  # one worker of that many threads: what a lone reply could use
            translators[threads] = ctranslate2.Translator(str(model.path), device="cpu", compute_type="int8",
                                                          inter_threads=1, intra_threads=threads)  # fmt: skip
    turns = full_window_conversations(1)[0]
    source = [model.vocabulary[i] for i in model.encode(turns)]

    def reply(threads: int, length: int):
        return lambda: translators[threads].translate_batch(
            [source], beam_size=1, min_decoding_length=length, max_decoding_length=length, return_end_token=True,
            max_input_length=0, no_repeat_ngram_size=3)  # fmt: skip

    for threads in translators:  # warm-up
        reply(threads, NEW_TOKENS)()
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    inside: list[float] = []
    original = model.translator

    class Translator:  # measures the raw call inside ChatModel.generate
        def translate_batch(self, *a, **k):
            started = time.perf_counter()
            try:
                return original.translate_batch(*a, **k)
            finally:
                inside.append(time.perf_counter() - started)

    recorder = None
    if args.perf:
        data = Path(tempfile.gettempdir()) / f"profile_step-{os.getpid()}.data"
        recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-o", str(data),
                                     "-p", str(os.getpid())], stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)  # perf attaches
        for _ in range(args.rounds * 2):
            reply(1, NEW_TOKENS)()
        recorder.send_signal(signal.SIGINT)
        recorder.wait()
    loads = []
    for _ in range(args.rounds):  # in turns, so drift hits all alike
        loads.append(os.getloadavg()[0])
        for threads in translators:
            rows[f"{threads} thread(s), 1 token"].append(timed(reply(threads, 1)))
            rows[f"{threads} thread(s), {NEW_TOKENS} tokens"].append(timed(reply(threads, NEW_TOKENS)))
        model.translator = Translator()
        rows["generate"].append(timed(lambda: model.generate([turns])))
        model.translator = original
    median = {key: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for key, v in rows.items()}
    print(f"{model.description}; full window, greedy; median of {args.rounds}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}\n")  # fmt: skip
    print("| one worker of | translate_batch, 1 token: wall / CPU s | 32 tokens: wall / CPU s "
          "| one decoding step ((32 - 1) / 31): wall / CPU ms |\n|---:|---:|---:|---:|")  # fmt: skip
    for threads in translators:
        one, full = median[f"{threads} thread(s), 1 token"], median[f"{threads} thread(s), {NEW_TOKENS} tokens"]
        step = [(f - o) / (NEW_TOKENS - 1) * 1000 for f, o in zip(full, one)]
        print(f"| {threads} thread(s) | {one[0]:.3f} / {one[1]:.3f} | {full[0]:.3f} / {full[1]:.3f} "
              f"| {step[0]:.1f} / {step[1]:.1f} |")  # fmt: skip
    print(f"\nChatModel.generate, {NEW_TOKENS} tokens, one thread: {median['generate'][0]:.3f} s wall, of which "
          f"{(median['generate'][0] - statistics.median(inside)) * 1000:.1f} ms outside translate_batch")  # fmt: skip
    if recorder is not None:
        report(data)
    return 0


def report(data: Path) -> None:
    """perf's samples of the 32-token replies by shared object, then the top
    symbols outside code generated at run time ([JIT]: oneDNN's or MKL's GEMM kernels)."""
    for sort, keep, top in (("dso", lambda line: True, 12), ("dso,symbol", lambda line: "[JIT]" not in line, 20)):
        out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", sort, "--percent-limit", "0.1"],
                             capture_output=True, text=True).stdout  # fmt: skip
        lines = [line.rstrip() for line in out.splitlines() if line.strip() and not line.startswith("#") and keep(line)]
        print(f"\nperf samples by {sort}" + (" (outside [JIT] code)" if sort != "dso" else "") + ":")
        print("\n".join(" ".join(line.split()[:2] + [" ".join(line.split()[2:])[:110]]) for line in lines[:top]))
    data.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
