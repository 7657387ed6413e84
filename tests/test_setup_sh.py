"""setup.sh's install of torch: the range pyproject.toml supports, from the CPU
build's index when it answers, else from the default index with one line saying so.

pip is a recording stand-in here (the real one would download GBs); the index is
a real HTTP server on 127.0.0.1, or a port where nothing listens.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO


def supported_torch() -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch] = [d for d in dependencies if d.startswith("torch") and d[5:6] in "<>=!~"]
    return torch


def run_setup(tmp_path: Path, torch_index: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """./setup.sh in a venv without torch whose pip and blender-chat only record how they were called."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> {calls}; exit 0; fi\n'
        'if [ "$1" = -c ] && [ "$2" = "import torch" ]; then exit 1; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    (bin_dir / "blender-chat").write_text(f'#!/usr/bin/env bash\necho "blender-chat $*" >> {calls}\n')
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    result = subprocess.run(
        ["bash", str(REPO / "setup.sh"), "chat"],
        env={"PATH": "/usr/bin:/bin", "VENV": str(tmp_path / "venv"), "TORCH_INDEX_URL": torch_index},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, calls.read_text().splitlines() if calls.exists() else []


@pytest.fixture
def index_url(tmp_path: Path) -> Iterator[str]:
    """A package index with a torch page, served over HTTP."""
    (tmp_path / "index" / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "index" / "cpu" / "torch" / "index.html").write_text("<html></html>")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(tmp_path / "index"), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cpu"
    finally:
        server.shutdown()
        server.server_close()


def test_torch_comes_from_the_cpu_index_in_the_supported_range(tmp_path: Path, index_url: str) -> None:
    result, calls = run_setup(tmp_path, index_url)
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"-m pip install {supported_torch()} --index-url {index_url}"
    assert calls[-1] == "blender-chat chat"
    assert "cannot reach" not in result.stderr


def test_an_unreachable_cpu_index_is_one_line_and_the_default_index_is_used(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}/cpu"
    result, calls = run_setup(tmp_path, unreachable)
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"-m pip install {supported_torch()}"
    [warning] = result.stderr.strip().splitlines()
    assert warning.startswith(f"setup.sh: cannot reach the CPU build's index ({unreachable});")
    assert "several GB" in warning
    assert calls[-1] == "blender-chat chat"
