"""The speed benchmark: our engine against the alternatives, in one run.

    python benchmarks/bench.py            # the 400M-distill shape (~25-35 min on 2 quiet cores)
    python benchmarks/bench.py --smoke    # a tiny model, ~2 min; the test suite runs this

Every contender runs in its own process (so peak RSS is its own), gets the same
conversations and generates exactly 32 new tokens per reply. Two workloads:
fresh one-line conversations (`short`) and conversations whose history fills
the 128-token window (`full`, as real ones do after a few exchanges). Contenders
take turns within each workload so machine drift hits all alike. Writes
results/<name>.md (table and targets), .png (throughput against concurrency)
and .json. See benchmarks/README.md.

Issue 24's four workloads only (beam 10 and greedy, full window, through the
engine and over HTTP against the naive server, with the bandwidth share):

    python benchmarks/bench.py --name issue24 --workloads full --cases 10x1,10x8,1x1,1x32 \
        --contenders naive,engine,http --fidelity-prompts 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from checkpoint import decoder_bytes_per_token, model_dir  # noqa: E402
from report import bandwidth_shares, write_report  # noqa: E402
from workloads import NEW_TOKENS, WORKLOADS, full_window_conversations, short_conversations  # noqa: E402

CONTENDERS = ("seed", "naive", "engine", "engine-transformers", "http")
# Run only when named in --contenders: a thread layout to compare with the default engine's.
OPTIONAL_CONTENDERS = ("engine-2x2",)


def memory_bandwidth(megabytes: int, threads: int | None = None) -> float:
    """Bytes per second of a large tensor copy (read + write, as STREAM's "copy"
    counts them), best of 5, on `threads` threads (None: torch's default, every core)."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        source = torch.ones(megabytes * 1024 * 1024 // 4)
        target = torch.empty_like(source)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(default)
    return 2 * source.numel() * 4 / best


class RssSampler:
    """The highest RSS of one process while a block runs (psutil, every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLENDERBOT_", "DISCORD_", "SLACK_", "MEMORY_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.update(extra)
    return env


class Worker:
    """A contender process from contenders.py, driven over stdin/stdout."""

    def __init__(self, kind: str, model: Path, beams: int, log) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "contenders.py"), kind, str(model), str(beams)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=_env(), cwd=REPO,
        )  # fmt: skip
        self.description = self._read()["ready"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"contender {self.kind} exited ({self.process.wait()}); see the log file")
        return json.loads(line)

    def call(self, op: str, **args) -> dict:
        with RssSampler(self.process.pid) as rss:
            self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.process.stdin.flush()
            result = self._read()
        result["peak_rss"] = rss.peak
        return result

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class HttpWorker:
    """The whole bot (`python -m bot run`, default settings) in a subprocess,
    driven over POST /api/chat. Its memory is a SQLite file: the history of a
    conversation is written there before the run, as earlier exchanges leave it
    (in a scratch directory of its own, removed when the worker closes)."""

    def __init__(self, model: Path, beams: int, log) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="blender-chat-bench-http-")
        directory = Path(self._scratch.name)
        with socket.socket() as probe:  # a free port for the server (it is told which)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.kind = "http"
        self.memory_url = f"sqlite:///{directory / f'http-memory-{beams}.db'}"
        env = _env(
            BLENDERBOT_MODEL=str(model), BLENDERBOT_NUM_BEAMS=str(beams), BLENDERBOT_MIN_NEW_TOKENS=str(NEW_TOKENS),
            BLENDERBOT_MAX_NEW_TOKENS=str(NEW_TOKENS), MEMORY_URL=self.memory_url, HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(port), LOG_LEVEL="WARNING", RATE_LIMIT_BURST="100000", RATE_LIMIT_PER_MINUTE="1000000",
            BLENDERBOT_CT2_DIR=str(model.parent / "ctranslate2"),
        )  # fmt: skip
        self.process = subprocess.Popen([sys.executable, "-m", "bot", "run"], stderr=log, stdout=log, env=env, cwd=REPO)
        self.runs = 0
        self.description = "python -m bot run"
        asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> None:
        import aiohttp

        deadline = time.monotonic() + 600
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"`python -m bot run` exited ({self.process.returncode}); see the log file")
                try:
                    async with session.get(self.url + "/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("`python -m bot run` did not become ready in 600 s")

    def call(self, op: str, conversations: list[list[str]], limit: int = 0) -> dict:
        assert op == "run"
        self.runs += 1
        ids = [f"bench-{self.runs}-{i}" for i in range(len(conversations))]
        asyncio.run(self._remember(ids, conversations))
        with RssSampler(self.process.pid) as rss:
            result = asyncio.run(self._run(ids, conversations))
        result["peak_rss"] = rss.peak
        return result

    async def _remember(self, ids: list[str], conversations: list[list[str]]) -> None:
        from bot.memory import open_store

        store = open_store(self.memory_url, max_turns=20)
        await store.open()
        try:
            for conversation, turns in zip(ids, conversations):
                for user, bot in zip(turns[:-1:2], turns[1::2]):
                    await store.append_exchange("web:" + conversation, user, bot)
        finally:
            await store.close()

    async def _run(self, ids: list[str], conversations: list[list[str]]) -> dict:
        import aiohttp

        started = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def request(i: int, conversation: str, text: str) -> float:
                body = {"conversation": conversation, "text": text, "user": f"bench-{i}"}
                async with session.post(self.url + "/api/chat", json=body) as response:
                    payload = await response.json()
                    if response.status != 200 or "reply" not in payload:
                        raise RuntimeError(f"/api/chat answered {response.status}: {payload}")
                return time.perf_counter() - started

            latencies = list(
                await asyncio.gather(*(request(i, c, t[-1]) for i, (c, t) in enumerate(zip(ids, conversations))))
            )
        return {"latencies": latencies, "wall": max(latencies), "tokens": len(conversations) * NEW_TOKENS,
                "replies": len(conversations), "extrapolated": False}  # fmt: skip

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._scratch.cleanup()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarise(contender: str, workload: str, beams: int, concurrency: int, result: dict) -> dict:
    wall = result["wall"]
    return {
        "contender": contender,
        "workload": workload,
        "beams": beams,
        "concurrency": concurrency,
        "replies": result["replies"],
        "replies_per_s": result["replies"] / wall,
        "tokens_per_s": result["tokens"] / wall,
        "p50_s": percentile(result["latencies"], 0.5),
        "p95_s": percentile(result["latencies"], 0.95),
        "peak_rss_mb": result["peak_rss"] / 2**20,
        "extrapolated": result["extrapolated"],
        "safety_retries": result.get("safety_retries"),
    }


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{args.name}.log", "w")
    model = model_dir(Path(args.cache), smoke=args.smoke)
    contenders = [c for c in CONTENDERS + OPTIONAL_CONTENDERS if c in args.contenders]
    notes = []
    print(f"model: {model}")
    if {"engine", "engine-2x2", "http"} & set(contenders):
        convert(model, log)
    # The limit is the better of one thread (what a lone reply decodes on) and all cores.
    size = 64 if args.smoke else 1024
    one_thread, all_cores = memory_bandwidth(size, 1), memory_bandwidth(size)
    bandwidth = max(one_thread, all_cores)
    print(f"memory bandwidth (copy, read + write): {one_thread / 1e9:.1f} GB/s on one thread, "
          f"{all_cores / 1e9:.1f} GB/s on all cores")  # fmt: skip
    decoder_bytes = decoder_bytes_per_token(json.loads((model / "config.json").read_text()))
    print(f"the int8 decoder reads {decoder_bytes / 1e6:.0f} MB per token: the bandwidth limit is "
          f"{bandwidth / decoder_bytes:.1f} tokens/s for one stream")  # fmt: skip
    most = max(args.concurrency)
    conversations = {name: WORKLOADS[name](most) for name in args.workloads}
    rows, extras, loads = [], {"descriptions": {}}, []
    for beams in args.beams:
        workers = {}
        for kind in contenders:
            print(f"starting {kind} (beams {beams})", flush=True)
            if kind == "http":
                workers[kind] = HttpWorker(model, beams, log)
            else:
                workers[kind] = Worker(kind, model, beams, log)
            extras["descriptions"][kind] = workers[kind].description
        try:
            turn = 0
            for workload in args.workloads:
                for concurrency in args.concurrency:
                    if args.cases and (beams, concurrency) not in args.cases:
                        continue
                    order = contenders[turn % len(contenders) :] + contenders[: turn % len(contenders)]
                    turn += 1
                    for kind in order:
                        limit = args.seed_requests if kind == "seed" else args.serial_requests
                        batch = conversations[workload][:concurrency]
                        result = workers[kind].call("run", conversations=batch, limit=limit)
                        row = summarise(kind, workload, beams, concurrency, result)
                        row["load_average"] = os.getloadavg()[0]
                        loads.append(row["load_average"])
                        rows.append(row)
                        print(
                            f"beams {beams:2d}  {workload:5s} x{concurrency:<3d} {kind:19s} {row['tokens_per_s']:8.1f} tok/s"
                            f"  p50 {row['p50_s']:7.2f}s  p95 {row['p95_s']:7.2f}s  peak {row['peak_rss_mb']:6.0f} MB"
                            f"  load {row['load_average']:.1f}" + ("  (queue extrapolated)" if row["extrapolated"] else ""),
                            flush=True,
                        )
            for kind in ("engine", "engine-transformers", "engine-2x2"):
                if kind in workers:
                    extras.setdefault(kind, {}).update(engine_extras(workers[kind], beams, bandwidth))
            if beams == 1 and "naive" in workers and args.fidelity_prompts > 0:
                extras["fidelity"] = workers["naive"].call(
                    "fidelity", conversations=full_window_conversations(args.fidelity_prompts)
                )
        finally:
            for worker in workers.values():
                worker.close()
    log.close()
    results = {
        "name": args.name,
        "smoke": args.smoke,
        "model": str(model),
        "new_tokens": NEW_TOKENS,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_one_thread_bytes_per_s": one_thread,
        "bandwidth_all_cores_bytes_per_s": all_cores,
        "decoder_bytes_per_token": decoder_bytes,
        "load_average": [min(loads), max(loads)] if loads else None,
        "rows": rows,
        "extras": extras,
        "notes": notes,
        "started": args.started,
        "seconds": time.monotonic() - args.t0,
    }
    write_report(results, out / args.name)
    for line in bandwidth_shares(results):
        print(line)
    print(f"wrote {out / args.name}.md, .png and .json in {results['seconds']:.0f}s")
    return results


def convert(model: Path, log) -> None:
    """Convert the model for CTranslate2 before the contenders start, as the image
    build does (`blender-chat download`), so no contender pays for it (or keeps
    torch loaded from converting)."""
    env = _env(BLENDERBOT_MODEL=str(model), BLENDERBOT_CT2_DIR=str(model.parent / "ctranslate2"))
    result = subprocess.run([sys.executable, "-m", "bot", "download"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log, text=True, timeout=1800)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError("`blender-chat download` could not convert the model; see the log file")
    print(result.stdout.strip().splitlines()[-1], flush=True)


def engine_extras(worker: Worker, beams: int, bandwidth: float) -> dict:
    """The engine's own time on lone replies (each reply minus the runtime's raw
    call inside it), and, greedy, the single-stream decode speed against the
    bandwidth limit and the steady RSS after the workloads."""
    lone = {"short": short_conversations(1)[0], "full": full_window_conversations(1)[0]}
    extras = {f"overhead_beam{beams}": worker.call("overhead", conversations=lone)}
    extras[f"overhead_beam{beams}"].pop("peak_rss", None)
    if beams == 1:
        decode = worker.call("decode", turns=lone["short"])
        extras["decode"] = {
            "tokens_per_s": 1 / decode["seconds_per_token"],
            "decoder_bytes_per_token": decode["decoder_bytes_per_token"],
            "bandwidth_limit_tokens_per_s": bandwidth / decode["decoder_bytes_per_token"],
        }
        extras["steady_rss_mb"] = worker.call("rss")["rss"] / 2**20
    return extras


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the benchmark runs, measures nothing")
    parser.add_argument("--name", help="results file name (default: latest, or smoke with --smoke)")
    parser.add_argument("--out", default=str(HERE / "results"), help="results directory (default: %(default)s)")
    parser.add_argument(
        "--cache", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "blender-chat-bench")),
        help="where the benchmark model is built once and reused (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--concurrency", default="1,8,32", help="concurrent conversations (default: %(default)s)")
    parser.add_argument("--beams", default="1,10", help="decodings: 1 is greedy (default: %(default)s)")
    parser.add_argument("--workloads", default="short,full", help="short, full or both (default: %(default)s)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="which to run (default: %(default)s)")
    parser.add_argument("--serial-requests", type=int, default=4, help="requests the naive server really serves per workload")
    parser.add_argument("--seed-requests", type=int, default=2, help="requests the seed-style contender serves per workload")
    parser.add_argument("--fidelity-prompts", type=int, default=8, help="0: skip the int8 fidelity check")
    parser.add_argument("--cases", default="", help="only these BEAMSxCONVERSATIONS pairs, e.g. 10x1,10x8,1x1,1x32 "
                        "(they replace --beams and --concurrency)")  # fmt: skip
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.beams = [int(b) for b in args.beams.split(",")]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.contenders = args.contenders.split(",")
    args.cases = {tuple(int(n) for n in case.split("x")) for case in args.cases.split(",") if case}
    if args.cases:  # only these (beams, conversations) pairs
        args.beams = sorted({b for b, _ in args.cases}, reverse=True)
        args.concurrency = sorted({c for _, c in args.cases})
    args.name = args.name or ("smoke" if args.smoke else "latest")
    if args.smoke:
        args.serial_requests, args.seed_requests, args.fidelity_prompts = 2, 1, 2
    args.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    args.t0 = time.monotonic()
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
