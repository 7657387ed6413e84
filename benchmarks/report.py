"""Turns one benchmark run into results/<name>.md, .png and .json."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "seed": "seed-style (load per request)",
    "naive": "naive server (fp32, lock)",
    "engine": "engine (ReplyEngine.reply)",
    "http": "engine over HTTP /api/chat",
}


def write_report(results: dict, base: Path) -> None:
    results["targets"] = targets(results)
    base.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(results))
    plot(results, base.with_suffix(".png"))


def _row(results: dict, contender: str, beams: int, concurrency: int) -> dict | None:
    for row in results["rows"]:
        if (row["contender"], row["beams"], row["concurrency"]) == (contender, beams, concurrency):
            return row
    return None


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value (None: not measured)."""
    engine32, naive32 = _row(results, "engine", 1, 32), _row(results, "naive", 1, 32)
    engine1, naive1 = _row(results, "engine", 1, 1), _row(results, "naive", 1, 1)
    extras = results["extras"]
    decode = extras.get("decode")
    raw = extras.get("raw_generate")
    rss = extras.get("engine_steady_rss_mb")

    def ratio(a, b, key):
        return a[key] / b[key] if a and b else None

    checks = [
        ("32 conversations greedy: engine throughput / naive", ratio(engine32, naive32, "tokens_per_s"), ">=", 25),
        ("1 conversation greedy: engine p50 latency / naive", ratio(engine1, naive1, "p50_s"), "<=", 0.3),
        (
            "1 conversation greedy: engine tokens/s / bandwidth limit",
            engine1["tokens_per_s"] / decode["bandwidth_limit_tokens_per_s"] if engine1 and decode else None,
            ">=",
            0.5,
        ),
        (
            "1 conversation: pure decode step / bandwidth limit (no encoder, no set-up)",
            decode["tokens_per_s"] / decode["bandwidth_limit_tokens_per_s"] if decode else None,
            ">=",
            0.5,
        ),
        (
            "32 conversations greedy: engine tokens/s / one raw batched generate",
            raw["engine_tokens_per_s"] / raw["tokens_per_s"] if raw else None,
            ">=",
            0.9,
        ),
        ("engine steady-state RSS (GB)", rss / 1024 if rss is not None else None, "<=", 1.2),
    ]
    out = []
    for name, value, op, goal in checks:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": name, "value": value, "goal": f"{op} {goal}", "met": met})
    return out


def markdown(results: dict) -> str:
    lines = [
        f"# Benchmark: {results['name']}" + (" (smoke: tiny model, numbers mean nothing)" if results["smoke"] else ""),
        "",
        f"{results['started']}, {results['cpu_cores']} cores, model `{Path(results['model']).name}`, "
        f"{results['new_tokens']} new tokens per reply (min = max), run took {results['seconds']:.0f} s. "
        f"Memory bandwidth (tensor copy): {results['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
        "| decoding | conversations | contender | replies/s | tokens/s | p50 s | p95 s | peak RSS MB "
        "| throughput x naive | p50 latency x naive |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        naive = _row(results, "naive", row["beams"], row["concurrency"])
        speed = f"{row['tokens_per_s'] / naive['tokens_per_s']:.2f}" if naive else "-"
        latency = f"{row['p50_s'] / naive['p50_s']:.2f}" if naive else "-"
        decoding = "greedy" if row["beams"] == 1 else f"beam {row['beams']}"
        mark = " *" if row["extrapolated"] else ""
        lines.append(
            f"| {decoding} | {row['concurrency']} | {LABELS[row['contender']]}{mark} | {row['replies_per_s']:.2f} "
            f"| {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['peak_rss_mb']:.0f} "
            f"| {speed} | {latency} |"
        )
    if any(row["extrapolated"] for row in results["rows"]):
        lines += ["", "\\* one request at a time: the first few requests were served and timed, the rest of the "
                  "queue extrapolated from their service times."]  # fmt: skip
    extras = results["extras"]
    lines += ["", "## Other measurements", ""]
    if "fidelity" in extras:
        f = extras["fidelity"]
        lines.append(
            f"- int8 fidelity: cosine similarity of int8 and fp32 next-token logits, mean {f['mean']:.4f}, "
            f"min {f['min']:.4f} over {f['positions']} positions."
        )
    if "decode" in extras:
        d = extras["decode"]
        lines.append(
            f"- Single-stream decode: {d['tokens_per_s']:.1f} tokens/s; the int8 decoder reads "
            f"{d['decoder_bytes_per_token'] / 1e6:.0f} MB per token, so the bandwidth limit is "
            f"{d['bandwidth_limit_tokens_per_s']:.1f} tokens/s ({d['tokens_per_s'] / d['bandwidth_limit_tokens_per_s']:.0%})."
        )
    if "raw_generate" in extras:
        r = extras["raw_generate"]
        lines.append(
            f"- Engine overhead: one raw batched `generate` over the same {r['prompts']} prompts "
            f"{r['tokens_per_s']:.1f} tokens/s, the engine {r['engine_tokens_per_s']:.1f} tokens/s "
            "(same process, in turns, best of two each); replies the safety filter sent back for a "
            f"sampled second generation in those two engine runs: {r.get('safety_retries', '?')}."
        )
    if "engine_steady_rss_mb" in extras:
        lines.append(f"- Engine steady-state RSS after the workloads: {extras['engine_steady_rss_mb']:.0f} MB.")
    lines += [f"- {note}" for note in results["notes"]]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beams = sorted({row["beams"] for row in results["rows"]})
    figure, axes = plt.subplots(1, len(beams), figsize=(6 * len(beams), 4.5), squeeze=False)
    for axis, beam in zip(axes[0], beams):
        for contender, label in LABELS.items():
            points = sorted(
                (row["concurrency"], row["tokens_per_s"])
                for row in results["rows"]
                if row["contender"] == contender and row["beams"] == beam
            )
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrent conversations")
        axis.set_ylabel("generated tokens/s")
        axis.set_title("greedy" if beam == 1 else f"beam {beam}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{Path(results['model']).name}: throughput against concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
