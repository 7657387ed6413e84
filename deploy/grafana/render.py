"""Draw the panels of blenderchat.json from a Prometheus, as the README's picture.

Grafana itself is not installable from the package registries this project's
machines reach, so this evaluates the dashboard's own queries on a real
Prometheus and draws each panel with matplotlib.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 60
        draw the last hour of a Prometheus that scrapes a running bot
    python deploy/grafana/render.py --demo --minutes 4
        start everything itself: `blender-chat run` on a tiny random model (tests/tiny_models.py),
        Debian's `prometheus` scraping its /metrics every 2 s, and a scripted load of web users
        who chat, burst, say something unsafe now and then and rate replies (more bad ones
        in the middle); then draw that run. Needs `apt-get install prometheus`.

Run from the repository root; writes deploy/grafana/dashboard.png (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DASHBOARD = HERE / "blenderchat.json"
RATE_INTERVAL = "20s"  # what Grafana's $__rate_interval would be for a 2 s scrape at this zoom
UNSAFE = "you are a fucking idiot"  # blocked by the safety filter: a safety_blocked sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=60.0, help="how much to draw (and, with --demo, to run)")
    parser.add_argument("--demo", action="store_true", help="run a bot, a Prometheus and a load first")
    parser.add_argument("--out", type=Path, default=HERE / "dashboard.png")
    args = parser.parse_args()
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="blenderchat-demo-") as scratch:
            demo(Path(scratch), args.minutes, args.out)
        return 0
    end = time.time()
    draw(args.prometheus, end - args.minutes * 60, end, args.out)
    return 0


# -- the picture ---------------------------------------------------------------


def draw(prometheus: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime

    panels = json.loads(DASHBOARD.read_text())["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) // 8
    figure = plt.figure(figsize=(15, 3.6 * rows), facecolor="#181b1f")
    grid = figure.add_gridspec(rows, 2, hspace=0.45, wspace=0.14)
    step = max(2.0, (end - start) / 300)
    for panel in panels:
        position = panel["gridPos"]
        row, column = position["y"] // 8, position["x"] // 12
        axes = figure.add_subplot(grid[row, :] if position["w"] == 24 else grid[row, column])
        _style(axes)
        axes.set_title(panel["title"], color="#d8d9da", loc="left", fontsize=11)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for labels, points in _query_range(prometheus, expr, start, end, step):
                if not points:
                    continue
                times = [datetime.fromtimestamp(t) for t, _ in points]
                values = [v * 100 if unit == "percentunit" else v for _, v in points]
                axes.plot(times, values, linewidth=1.8, label=_legend(target["legendFormat"], labels))
        if unit == "percentunit":
            axes.set_ylim(0, 100)
            axes.set_ylabel("%", color="#9fa7b3")
        elif unit in ("s", "reqps"):
            axes.set_ylabel({"s": "seconds", "reqps": "per second"}[unit], color="#9fa7b3")
        axes.xaxis.set_major_locator(mdates.MinuteLocator())
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="upper left", fontsize=8, facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#d8d9da")
        else:
            axes.text(0.5, 0.5, "No data", transform=axes.transAxes, ha="center", color="#9fa7b3")
    figure.suptitle("blender-chat (deploy/grafana/blenderchat.json, drawn from Prometheus by render.py)",
                    color="#d8d9da", x=0.01, ha="left", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, facecolor=figure.get_facecolor(), bbox_inches="tight")
    print(f"wrote {out}")


def _style(axes) -> None:
    axes.set_facecolor("#111217")
    for spine in axes.spines.values():
        spine.set_color("#2c3235")
    axes.tick_params(colors="#9fa7b3", labelsize=8)
    axes.grid(color="#2c3235", linewidth=0.6)


def _legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as response:
        data = json.load(response)
    if data.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {data}")
    series = []
    for result in data["data"]["result"]:
        points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
        series.append((result["metric"], points))
    return series


# -- the demo run --------------------------------------------------------------------


def demo(scratch: Path, minutes: float, out: Path) -> None:
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        raise SystemExit("render.py --demo needs Prometheus: apt-get install prometheus")
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_blenderbot

    model = build_blenderbot(scratch / "model")
    bot_port, prometheus_port = _free_port(), _free_port()
    env = {**os.environ, "BLENDERBOT_MODEL": str(model), "BLENDERBOT_MAX_NEW_TOKENS": "24",
           "BLENDERBOT_NUM_BEAMS": "1", "MEMORY_URL": f"sqlite:///{scratch}/memory.db", "HTTP_HOST": "127.0.0.1",
           "HTTP_PORT": str(bot_port), "RATE_LIMIT_PER_MINUTE": "0", "WEB_RATE_LIMIT_PER_MINUTE": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        env.pop(name, None)
    config = scratch / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n"
        f"scrape_configs:\n  - job_name: blender-chat\n    static_configs:\n      - targets: ['127.0.0.1:{bot_port}']\n"
    )
    bot = subprocess.Popen([sys.executable, "-m", "bot", "run"], env=env, cwd=scratch,
                           stdout=open(scratch / "bot.log", "wb"), stderr=subprocess.STDOUT)
    prometheus = subprocess.Popen(
        [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={scratch / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=open(scratch / "prometheus.log", "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{prometheus_port}"
    try:
        _wait_until_ready(f"http://127.0.0.1:{bot_port}/readyz", bot)
        start = time.time()
        asyncio.run(_load(f"http://127.0.0.1:{bot_port}", minutes * 60))
        time.sleep(6)  # the last scrapes
        end = time.time()
        draw(url, start, end, out)
    finally:
        for process in (bot, prometheus):
            process.send_signal(signal.SIGTERM)
        for process in (bot, prometheus):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def _load(base: str, seconds: float) -> None:
    """Web users chatting and rating for `seconds`: a steady trickle, bursts now and then,
    an unsafe message once in a while, and more bad ratings in the middle third."""
    import aiohttp

    random.seed(7)
    started = time.monotonic()
    topics = ["music", "books", "the weather", "cooking", "football", "travel", "cats", "films"]

    async def user(session: aiohttp.ClientSession, name: str) -> None:
        while time.monotonic() - started < seconds:
            elapsed = (time.monotonic() - started) / seconds
            text = UNSAFE if random.random() < 0.04 else f"what do you think about {random.choice(topics)}?"
            async with session.post(f"{base}/api/chat", json={"conversation": name, "text": text,
                                                               "user": name}) as response:
                body = await response.json()
            if body.get("exchange_id") is not None and random.random() < 0.6:
                bad_share = 0.55 if 1 / 3 < elapsed < 2 / 3 else 0.15
                rating = "bad" if random.random() < bad_share else "good"
                await session.post(f"{base}/api/feedback", json={"conversation": name,
                                                                  "exchange_id": body["exchange_id"],
                                                                  "rating": rating, "user": name})
            burst = 1 / 3 < elapsed < 1 / 2 or random.random() < 0.1
            await asyncio.sleep(random.uniform(0.0, 0.4) if burst else random.uniform(1.0, 4.0))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(user(session, f"user{index}") for index in range(12)))


def _wait_until_ready(url: str, bot: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if bot.poll() is not None:
            raise SystemExit("blender-chat run exited early")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("blender-chat run did not become ready")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
