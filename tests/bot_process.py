"""`python -m bot run` as a subprocess, for tests that need the real process:
its start-up, its signals, its exit status and its log."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import REPO, subprocess_env
from prometheus_client.parser import text_string_to_metric_families

LISTENING = re.compile(r"Web server listening on http://([^:\s]+):(\d+)")


class BotProcess:
    def __init__(self, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "run"],
            cwd=REPO,
            env=subprocess_env(**env),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.port = 0

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 90.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log)
            if match:
                self.port = int(match.group(2))
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(f"bot exited with {self.proc.returncode} before listening:\n{self.log}")
            time.sleep(0.1)
        raise AssertionError(f"bot did not start listening within {timeout}s:\n{self.log}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /readyz until it answers 200."""
        self.wait_listening()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as error:
                last = error.read()
            except OSError as error:
                last = error
            if self.proc.poll() is not None:
                raise AssertionError(f"bot exited with {self.proc.returncode} before it was ready:\n{self.log}")
            time.sleep(0.1)
        raise AssertionError(f"/readyz never turned 200 (last: {last!r}):\n{self.log}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


def run_once(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=REPO,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def port_env() -> dict[str, str]:
    """Port 0: the bot binds a free port and logs it, so parallel runs never collide."""
    # One thread each: the test machine is shared, and oversubscribed torch threads crawl.
    return {"HTTP_PORT": "0", "HTTP_HOST": "127.0.0.1", "WEB_API_TOKEN": "", "BLENDERBOT_THREADS": "1"}


def http(
    method: str, url: str, body: object = None, *, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any, Any]:
    """One request; returns (status, headers, parsed JSON or text). HTTP errors are results, not exceptions."""
    import json

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = dict(headers or {})
    if data is not None and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json"  # what the API asks for (urllib would say form data)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, response_headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, response_headers, payload = error.code, error.headers, error.read()
    text = payload.decode("utf-8", errors="replace")
    if response_headers.get("Content-Type", "").startswith("application/json"):
        return status, response_headers, json.loads(text)
    return status, response_headers, text


def metric(base: str, name: str, **labels: str) -> float:
    """The value of one sample on the bot's /metrics (0 if absent)."""
    status, _, text = http("GET", base + "/metrics")
    assert status == 200
    return sample(text, name, **labels)


def sample(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
