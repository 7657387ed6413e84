"""Turns one benchmark run into results/<name>.md, .png and .json."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "seed": "seed-style (load per request)",
    "naive": "naive server (fp32, lock)",
    "engine": "engine (ReplyEngine.reply, defaults)",
    "engine-transformers": "engine on transformers",
    "engine-2x2": "engine, CTranslate2 2 workers x 2 threads",
    "http": "engine over HTTP /api/chat",
}
WORKLOAD_LABELS = {"short": "short", "full": "full window"}


def write_report(results: dict, base: Path) -> None:
    results["targets"] = targets(results)
    base.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(results))
    plot(results, base.with_suffix(".png"))


def _row(results: dict, contender: str, workload: str, beams: int, concurrency: int) -> dict | None:
    for row in results["rows"]:
        if (row["contender"], row["workload"], row["beams"], row["concurrency"]) == (contender, workload, beams, concurrency):
            return row
    return None


def targets(results: dict) -> list[dict]:
    """Issue 11's targets, each with the measured value (None: not measured), for
    the default engine and, for comparison, the engine on transformers."""

    def ratio(contender, workload, beams, concurrency, key):
        a = _row(results, contender, workload, beams, concurrency)
        b = _row(results, "naive", workload, beams, concurrency)
        return a[key] / b[key] if a and b else None

    out = []
    for contender in ("engine", "engine-transformers"):
        extras = results["extras"].get(contender, {})
        overhead = extras.get("overhead_beam1", {})
        rss = extras.get("steady_rss_mb")
        checks = [
            ("beam 10, 8 conversations, full window: p50 latency / naive", ratio(contender, "full", 10, 8, "p50_s"), "<=", 0.15),
            ("beam 10, 32 conversations, full window: p95 latency / naive", ratio(contender, "full", 10, 32, "p95_s"), "<=", 0.15),
            ("beam 10, 1 conversation, full window: latency / naive", ratio(contender, "full", 10, 1, "p50_s"), "<=", 0.20),
            ("beam 10, 1 conversation, short: latency / naive", ratio(contender, "short", 10, 1, "p50_s"), "<=", 0.20),
            ("greedy, 32 conversations, short: throughput / naive", ratio(contender, "short", 1, 32, "tokens_per_s"), ">=", 30),
            ("greedy, 32 conversations, full window: throughput / naive", ratio(contender, "full", 1, 32, "tokens_per_s"), ">=", 30),
            ("greedy, 1 conversation, short: latency / naive", ratio(contender, "short", 1, 1, "p50_s"), "<=", 0.22),
            ("greedy, 1 conversation, full window: latency / naive", ratio(contender, "full", 1, 1, "p50_s"), "<=", 0.22),
            ("greedy, 1 conversation: the engine's own time / the runtime's raw call, short",
             overhead.get("short", {}).get("ratio"), "<=", 0.10),
            ("greedy, 1 conversation: the engine's own time / the runtime's raw call, full window",
             overhead.get("full", {}).get("ratio"), "<=", 0.10),
            ("steady RSS after the workloads (GB)", rss / 1024 if rss is not None else None, "<=", 0.8),
        ]  # fmt: skip
        for name, value, op, goal in checks:
            met = None if value is None else (value >= goal if op == ">=" else value <= goal)
            out.append({"contender": contender, "target": name, "value": value, "goal": f"{op} {goal}", "met": met})
    measured = {row["contender"] for row in results["rows"]}
    layouts = ["engine-2x2"] if "engine-2x2" in measured else []  # a thread layout, when compared
    for contender in ["engine", *layouts, "http"]:  # issue 24's, on the full window
        limit = bandwidth_limit(results)
        lone = _row(results, contender, "full", 1, 1)
        checks = [
            ("issue 24: beam 10, 1 conversation, full window: latency / naive", ratio(contender, "full", 10, 1, "p50_s"), "<=", 0.15),
            ("issue 24: beam 10, 8 conversations, full window: median wait / naive", ratio(contender, "full", 10, 8, "p50_s"), "<=", 0.15),
            ("issue 24: greedy, 1 conversation, full window: latency / naive", ratio(contender, "full", 1, 1, "p50_s"), "<=", 0.30),
            ("issue 24: greedy, 32 conversations, full window: tokens/s / naive", ratio(contender, "full", 1, 32, "tokens_per_s"), ">=", 25),
            ("issue 24: greedy, 1 conversation, full window: tokens/s / bandwidth limit",
             lone["tokens_per_s"] / limit if lone and limit else None, ">=", 0.70),
        ]  # fmt: skip
        for name, value, op, goal in checks:
            met = None if value is None else (value >= goal if op == ">=" else value <= goal)
            out.append({"contender": contender, "target": name, "value": value, "goal": f"{op} {goal}", "met": met})
    return out


def bandwidth_limit(results: dict) -> float | None:
    """Tokens/s one stream could decode if reading the int8 decoder's weights once
    per token at the measured copy bandwidth were all it did."""
    per_token = results.get("decoder_bytes_per_token")
    return results["bandwidth_bytes_per_s"] / per_token if per_token else None


def bandwidth_shares(results: dict) -> list[str]:
    """Lines saying how near a lone greedy reply comes to the bandwidth limit
    (issue 24, item 2): the whole reply (encoder and all, through the engine and
    over HTTP), and the decoding step alone."""
    limit = bandwidth_limit(results)
    if not limit:
        return []
    lines = [
        f"Bandwidth limit: {results['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (the better copy, read + write, of one "
        f"thread, {results.get('bandwidth_one_thread_bytes_per_s', 0) / 1e9:.1f} GB/s, and all cores, "
        f"{results.get('bandwidth_all_cores_bytes_per_s', 0) / 1e9:.1f} GB/s) / "
        f"{results['decoder_bytes_per_token'] / 1e6:.0f} MB the int8 decoder reads per token = {limit:.1f} tokens/s."
    ]
    for row in results["rows"]:
        if row["beams"] == 1 and row["concurrency"] == 1 and row["contender"] in ("engine", "engine-2x2", "http"):
            lines.append(
                f"A lone greedy reply, {WORKLOAD_LABELS[row['workload']]}, {LABELS[row['contender']]}: "
                f"{row['tokens_per_s']:.1f} tokens/s = {row['tokens_per_s'] / limit:.0%} of the limit."
            )
    decode = results["extras"].get("engine", {}).get("decode")
    if decode:
        lines.append(
            f"Its decoding step alone (raw translate_batch, 32 tokens against 2): {decode['tokens_per_s']:.1f} tokens/s "
            f"= {decode['tokens_per_s'] / limit:.0%} of the limit."
        )
    return lines


def markdown(results: dict) -> str:
    load = results.get("load_average")
    lines = [
        f"# Benchmark: {results['name']}" + (" (smoke: tiny model, numbers mean nothing)" if results["smoke"] else ""),
        "",
        f"{results['started']}, {results['cpu_cores']} cores, model `{Path(results['model']).name}`, "
        f"{results['new_tokens']} new tokens per reply (min = max), run took {results['seconds']:.0f} s"
        + (f", load average {load[0]:.1f}-{load[1]:.1f}" if load else "")
        + f". Memory bandwidth (tensor copy): {results['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
    ]
    for kind, description in results["extras"].get("descriptions", {}).items():
        lines.append(f"- {LABELS[kind]}: {description}")
    lines += [
        "",
        "| decoding | workload | conversations | contender | replies/s | tokens/s | p50 s | p95 s | peak RSS MB "
        "| throughput x naive | p50 x naive | p95 x naive |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        naive = _row(results, "naive", row["workload"], row["beams"], row["concurrency"])
        speed = f"{row['tokens_per_s'] / naive['tokens_per_s']:.2f}" if naive else "-"
        p50 = f"{row['p50_s'] / naive['p50_s']:.2f}" if naive else "-"
        p95 = f"{row['p95_s'] / naive['p95_s']:.2f}" if naive else "-"
        decoding = "greedy" if row["beams"] == 1 else f"beam {row['beams']}"
        mark = " *" if row["extrapolated"] else ""
        retries = f" ({row['safety_retries']} retried)" if row.get("safety_retries") else ""
        lines.append(
            f"| {decoding} | {WORKLOAD_LABELS[row['workload']]} | {row['concurrency']} | {LABELS[row['contender']]}{mark}{retries} "
            f"| {row['replies_per_s']:.2f} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} "
            f"| {row['peak_rss_mb']:.0f} | {speed} | {p50} | {p95} |"
        )
    if any(row["extrapolated"] for row in results["rows"]):
        lines += ["", "\\* one request at a time: the first few requests were served and timed, the rest of the "
                  "queue extrapolated from their service times."]  # fmt: skip
    if any(row.get("safety_retries") for row in results["rows"]):
        lines += ["", "(N retried): replies of random weights the safety filter sent back for a sampled second "
                  "generation (SAFETY=on, the default), each one more generation for the engine."]  # fmt: skip
    extras = results["extras"]
    lines += ["", "## Other measurements", ""]
    if "fidelity" in extras:
        f = extras["fidelity"]
        lines.append(
            f"- transformers int8 fidelity: cosine similarity of int8 and fp32 next-token logits, mean {f['mean']:.4f}, "
            f"min {f['min']:.4f} over {f['positions']} positions."
        )
    for kind in ("engine", "engine-transformers", "engine-2x2"):
        e = extras.get(kind)
        if not e:
            continue
        for key in sorted(k for k in e if k.startswith("overhead_beam")):
            beams = key.removeprefix("overhead_beam")
            parts = [
                f"{WORKLOAD_LABELS[w]} {o['reply_s']:.3f} s, of which {o['overhead_s'] * 1000:.0f} ms ({o['ratio']:.0%}) "
                "outside the raw call"
                for w, o in e[key].items()
            ]
            decoding = "greedy" if beams == "1" else f"beam {beams}"
            lines.append(f"- {LABELS[kind]}, a lone {decoding} reply: " + "; ".join(parts) + " (median of 3).")
        if "decode" in e:
            d = e["decode"]
            lines.append(
                f"- {LABELS[kind]}, single-stream decode: {d['tokens_per_s']:.1f} tokens/s; the int8 decoder reads "
                f"{d['decoder_bytes_per_token'] / 1e6:.0f} MB per token, so the bandwidth limit is "
                f"{d['bandwidth_limit_tokens_per_s']:.1f} tokens/s ({d['tokens_per_s'] / d['bandwidth_limit_tokens_per_s']:.0%})."
            )
        if "steady_rss_mb" in e:
            lines.append(f"- {LABELS[kind]}, steady-state RSS after the workloads: {e['steady_rss_mb']:.0f} MB.")
    lines += [f"- {note}" for note in results["notes"]]
    lines += [f"- {line}" for line in bandwidth_shares(results)]
    lines += ["", "## Targets", "", "| contender | target | measured | goal | met |", "|---|---|---:|---|---|"]
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {LABELS[t['contender']]} | {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(row["workload"], row["beams"]) for row in results["rows"]}, key=lambda p: (p[1], p[0]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for axis, (workload, beams) in zip(axes[0], panels):
        for contender, label in LABELS.items():
            points = sorted(
                (row["concurrency"], row["tokens_per_s"])
                for row in results["rows"]
                if (row["contender"], row["workload"], row["beams"]) == (contender, workload, beams)
            )
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrent conversations")
        axis.set_ylabel("generated tokens/s")
        axis.set_title(("greedy" if beams == 1 else f"beam {beams}") + f", {WORKLOAD_LABELS[workload]}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{Path(results['model']).name}: throughput against concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
