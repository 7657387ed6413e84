"""The CTranslate2 cache shared by processes (replicas on one `/data` volume):
two processes converting one model at once, and a conversion killed half-way.
Real processes; where the kernel allows, each runs as PID 1 of its own PID
namespace, as replicas do in their containers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from bot.ct2_convert import checkpoint_id, conversion_stamp, ensure_converted

SCRIPT = REPO / "tests" / "ct2_cache_process.py"
DEADLINE = 180  # seconds for something that should happen within a few: only a hang hits it


def _pid_one_prefix() -> list[str] | None:
    """A command prefix that runs a program as PID 1 of a new PID namespace, or None."""
    for prefix in (["unshare", "--pid", "--fork"], ["unshare", "--user", "--map-root-user", "--pid", "--fork"]):
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-c", "import os; print(os.getpid())"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "1":
            return prefix
    return None


PID_ONE = _pid_one_prefix()
PIDS = [
    pytest.param(
        True, id="both-pid-1",
        marks=pytest.mark.skipif(PID_ONE is None, reason="PID namespaces (unshare) are not available here"),
    ),
    pytest.param(False, id="distinct-pids"),
]  # fmt: skip


class Converter:
    """One `ct2_cache_process.py`, its output in files under `work`."""

    def __init__(self, work: Path, name: str, model: Path, cache: Path, pid_one: bool, **hold: Path) -> None:
        self.ready, self.go = work / f"{name}.ready", work / f"{name}.go"
        self.out, self.log = work / f"{name}.out", work / f"{name}.log"
        options = [f"--{key}={value}" for key, value in hold.items()]
        command = [sys.executable, str(SCRIPT), f"--model={model}", f"--cache={cache}", f"--ready={self.ready}"]
        command += [f"--go={self.go}", *options]
        with open(self.out, "w") as out, open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*(PID_ONE if pid_one else []), *command],
                stdout=out, stderr=log, env=subprocess_env(), start_new_session=True,
            )  # fmt: skip

    def start(self) -> None:
        wait_until(self.ready.exists, self)
        self.go.touch()

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()

    def exited(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> dict:
        assert self.process.wait(timeout=DEADLINE) == 0, self.log.read_text()[-3000:]
        return json.loads(self.out.read_text().strip().splitlines()[-1])

    def kill(self) -> None:
        """SIGKILL its whole process group, as an OOM kill of the container does."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=DEADLINE)

    def conversions(self) -> int:
        return self.log.read_text().count("Converting ")


def wait_until(condition: Callable[[], bool], *processes: Converter) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        for process in processes:
            assert not process.exited() or condition(), f"exited early:\n{process.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def scratch_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if ".building-" in p.name]


def assert_served_by_ctranslate2(result: dict, cache: Path) -> None:
    assert result["description"].startswith("ctranslate2"), result  # not the fallback to transformers
    assert result["new_tokens"] > 0
    assert Path(result["path"]).parent == cache and (Path(result["path"]) / "model.bin").is_file()


@pytest.mark.timeout(2 * DEADLINE)
@pytest.mark.parametrize("pid_one", PIDS)
def test_two_processes_converting_one_model_at_once_both_serve_it_converted_once(
    blenderbot_dir, tmp_path, pid_one
):
    cache = tmp_path / "ct2"
    first = Converter(
        tmp_path, "first", blenderbot_dir, cache, pid_one, written=tmp_path / "written", release=tmp_path / "release"
    )
    second = Converter(tmp_path, "second", blenderbot_dir, cache, pid_one)
    try:
        first.start()
        wait_until((tmp_path / "written").exists, first)  # the first is half-way through its conversion
        assert scratch_dirs(cache)
        second.start()
        # The second waits for the first (or, where nothing makes it wait, does whatever it does, to the end).
        wait_until(lambda: second.logged("Waiting for another process converting") or second.exited(), second)
        (tmp_path / "release").touch()
        results = [first.result(), second.result()]
    finally:
        for process in (first, second):
            if not process.exited():
                process.kill()
    for result in results:
        assert_served_by_ctranslate2(result, cache)
    assert results[0]["path"] == results[1]["path"]
    assert first.conversions() + second.conversions() == 1  # the second used the first's conversion
    assert scratch_dirs(cache) == []


@pytest.mark.timeout(2 * DEADLINE)
@pytest.mark.parametrize("pid_one", PIDS)
def test_after_a_conversion_killed_half_way_the_next_start_converts_and_removes_the_leftover(
    blenderbot_dir, tmp_path, pid_one
):
    cache = tmp_path / "ct2"
    killed = Converter(tmp_path, "killed", blenderbot_dir, cache, pid_one, written=tmp_path / "written")
    try:
        killed.start()
        wait_until((tmp_path / "written").exists, killed)
    finally:
        killed.kill()
    [leftover] = scratch_dirs(cache)
    assert any(leftover.rglob("model.bin"))  # what an OOM kill leaves: ~400 MB for the 400M model

    restarted = Converter(tmp_path, "restarted", blenderbot_dir, cache, pid_one)
    restarted.start()
    result = restarted.result()
    assert_served_by_ctranslate2(result, cache)
    assert restarted.conversions() == 1
    assert not leftover.exists() and scratch_dirs(cache) == []


def test_a_damaged_conversion_another_process_rebuilt_meanwhile_is_used_not_rebuilt(blenderbot_dir, tmp_path, caplog):
    """Two replicas both fail to load one damaged conversion: the first to take
    the lock rebuilds it, the second then finds the rebuilt one and uses it
    (rebuilding again would delete it under the first one's feet)."""
    caplog.set_level(logging.INFO, logger="bot.ct2_convert")
    cache, source = tmp_path / "ct2", checkpoint_id(str(blenderbot_dir), blenderbot_dir)

    def converted(damaged=None) -> Path:
        return ensure_converted(str(blenderbot_dir), source, cache, "int8", lambda: blenderbot_dir, damaged)

    target = converted()
    (target / "model.bin").write_bytes(b"half a file")  # a disk that filled up
    damaged = conversion_stamp(target)
    caplog.clear()
    assert converted(damaged) == target  # the first replica rebuilds it
    rebuilt = conversion_stamp(target)
    assert len([r for r in caplog.records if "Converting" in r.getMessage()]) == 1 and rebuilt != damaged
    caplog.clear()
    assert converted(damaged) == target  # the second, with the same damaged stamp
    assert [r for r in caplog.records if "Converting" in r.getMessage()] == [] and conversion_stamp(target) == rebuilt
