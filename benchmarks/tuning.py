"""Tuning for a lone conversation: runtime settings side by side, in turns.

    python benchmarks/tuning.py                       # the 400M shape, ~10 min on 2 cores
    python benchmarks/tuning.py --smoke               # a tiny model: checks the script
    python benchmarks/tuning.py --variants ct2-int8,ct2-int8-packed --rounds 7

Each variant runs in its own process (environment variables such as
CT2_USE_EXPERIMENTAL_PACKED_GEMM are read when CTranslate2 loads), loads the
model once and serves one conversation at a time; the variants take turns
within every round so machine drift hits all alike. Prints the median wall and CPU seconds
of each workload (1 conversation, 32 new tokens; greedy and beam 10; a short
prompt and a full 128-token window) and the load average during the run.
Results are recorded in benchmarks/README.md ("Tuning for one conversation").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from checkpoint import model_dir  # noqa: E402
from workloads import NEW_TOKENS, full_window_conversations, short_conversations  # noqa: E402

# name: (runtime settings, extra environment)
VARIANTS = {
    "transformers-int8": ({"BLENDERBOT_RUNTIME": "transformers"}, {}),
    "ct2-int8": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {}),
    "ct2-int8-packed": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"CT2_USE_EXPERIMENTAL_PACKED_GEMM": "1"}),
    "ct2-int8-avx512": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"CT2_FORCE_CPU_ISA": "AVX512"}),
    "ct2-int8-1thread": ({"BLENDERBOT_RUNTIME": "ctranslate2", "BLENDERBOT_THREADS": "1"}, {}),
    # One worker of two threads: a lone reply's GEMVs on both cores (issue 24), batches not split.
    "ct2-int8-1x2": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"BENCH_CT2_LAYOUT": "1x2"}),
    "ct2-int8-2x2": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"BENCH_CT2_LAYOUT": "2x2"}),
    "ct2-int8-onednn": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"CT2_USE_MKL": "0"}),
    "ct2-int8-onednn-avx512": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"CT2_USE_MKL": "0", "CT2_FORCE_CPU_ISA": "AVX512"}),
    "ct2-int8-mkl": ({"BLENDERBOT_RUNTIME": "ctranslate2"}, {"CT2_USE_MKL": "1"}),
    "ct2-int16": ({"BLENDERBOT_RUNTIME": "ctranslate2", "CT2_COMPUTE_TYPE": "int16"}, {}),
    "ct2-float32": ({"BLENDERBOT_RUNTIME": "ctranslate2", "BLENDERBOT_QUANTIZE": "none"}, {}),
}
WORKLOADS = [("greedy", 1, "short"), ("greedy", 1, "full"), ("beam 10", 10, "short"), ("beam 10", 10, "full")]


def serve(model: str) -> None:
    """The variant process: load with the settings in the environment, then time
    one reply per command line ({"beams": N, "workload": ...}) until stdin closes."""
    sys.path.insert(0, str(REPO))
    from bot.config import load_settings
    from bot.model import load_chat_model

    settings = load_settings(
        {**os.environ, "BLENDERBOT_MODEL": model, "BLENDERBOT_MIN_NEW_TOKENS": str(NEW_TOKENS),
         "BLENDERBOT_MAX_NEW_TOKENS": str(NEW_TOKENS)},
        dotenv=False,
    )  # fmt: skip
    compute_type = os.environ.get("CT2_COMPUTE_TYPE")
    layout = os.environ.get("BENCH_CT2_LAYOUT")  # WORKERSxTHREADS, instead of bot.ct2_model.thread_split's
    models = {}
    for beams in (1, 10):
        from dataclasses import replace

        chat_model = load_chat_model(replace(settings, num_beams=beams))
        if (compute_type or layout) and hasattr(chat_model, "translator"):
            import ctranslate2

            workers, threads = (int(n) for n in layout.split("x")) if layout else (1, settings.threads or 0)
            chat_model.translator = ctranslate2.Translator(
                str(chat_model.path), compute_type=compute_type or "int8", inter_threads=workers, intra_threads=threads
            )
            chat_model.workers = workers
            chat_model.description += f" (as {workers} x {threads})"
        models[beams] = chat_model
    conversations = {"short": short_conversations(1)[0], "full": full_window_conversations(1)[0]}
    print(json.dumps({"ready": models[1].description}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        models[command["beams"]].generate([conversations[command["workload"]]])
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench"))
    )
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    model = model_dir(Path(args.cache), smoke=args.smoke)
    names = args.variants.split(",")
    processes = {}
    for name in names:
        settings, extra = VARIANTS[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BLENDERBOT_", "CT2_"))}
        env.update(settings, **extra, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", LOG_LEVEL="WARNING",
                   BLENDERBOT_CT2_DIR=str(Path(args.cache) / "ctranslate2"))  # fmt: skip
        processes[name] = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            text=True,
        )  # fmt: skip
        print(f"{name}: {json.loads(processes[name].stdout.readline())['ready']}", flush=True)
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    loads = []
    for round_ in range(args.rounds):
        for label, beams, workload in WORKLOADS:
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                process = processes[name]
                process.stdin.write(json.dumps({"beams": beams, "workload": workload}) + "\n")
                process.stdin.flush()
                answer = json.loads(process.stdout.readline())
                times.setdefault((name, f"{label}, {workload}"), []).append(answer["seconds"])
                cpu.setdefault((name, f"{label}, {workload}"), []).append(answer["cpu_seconds"])
        loads.append(os.getloadavg()[0])
    for process in processes.values():
        process.stdin.close()
        process.wait(60)
    columns = [f"{label}, {workload}" for label, _, workload in WORKLOADS]
    print(f"\n{args.rounds} rounds, median seconds for one reply of {NEW_TOKENS} new tokens; "
          f"load average {min(loads):.1f}-{max(loads):.1f}\n")  # fmt: skip
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{statistics.median(times[name, c]):.3f}" for c in columns) + " |")
    print("\nCPU seconds the variant's process used for the reply (median; less sensitive to other load):\n")
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{statistics.median(cpu[name, c]):.3f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
