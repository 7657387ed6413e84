"""Shared fixtures: tiny BlenderBot checkpoints of both families and engines over them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub call fails at once instead of hanging
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

# A hook: fails the test during which the fake Discord saw a contract violation.
from discord_contract import pytest_runtest_call  # noqa: E402, F401
from tiny_models import build_blenderbot, build_blenderbot_small  # noqa: E402

from bot.config import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ("ctranslate2", "transformers")

# Models converted for CTranslate2 by this test session, shared by every test and
# subprocess (each tiny checkpoint is converted once). Set by the fixture below.
CT2_DIR: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def ct2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    global CT2_DIR
    CT2_DIR = tmp_path_factory.mktemp("ctranslate2")
    return CT2_DIR


@pytest.fixture(scope="session")
def blenderbot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blenderbot(tmp_path_factory.mktemp("tiny-blenderbot"))


@pytest.fixture(scope="session")
def blenderbot_small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blenderbot_small(tmp_path_factory.mktemp("tiny-blenderbot-small"))


@pytest.fixture(scope="session")
def tiny_models(blenderbot_dir: Path, ct2_dir: Path) -> dict:
    """The tiny BlenderBot on each runtime, loaded once each through the same path as a hub id."""
    from bot.model import load_chat_model

    return {
        runtime: load_chat_model(
            Settings(model=str(blenderbot_dir), max_new_tokens=8, num_beams=1, runtime=runtime, ct2_dir=ct2_dir)
        )
        for runtime in RUNTIMES
    }


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict):
    """The tiny BlenderBot on the default runtime (BLENDERBOT_RUNTIME=auto: CTranslate2 on CPU)."""
    return tiny_models["ctranslate2"]


@pytest.fixture
def make_settings(blenderbot_dir: Path, ct2_dir: Path) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        # Rate limits off unless a test sets them: many tests send bursts from one user on purpose.
        base = Settings(
            model=str(blenderbot_dir), memory_url="memory://", max_new_tokens=8, num_beams=1, rate_limit_per_minute=0,
            ct2_dir=ct2_dir,
        )  # fmt: skip
        return replace(base, **overrides)

    return make


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running `python -m bot` from this checkout in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLENDERBOT_", "DISCORD_", "SLACK_", "MEMORY_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", LOG_LEVEL="INFO")
    # Like make_settings: rate limits stay off unless a test sets them, so bursts test what they mean to.
    env.update(RATE_LIMIT_PER_MINUTE="0")
    if CT2_DIR is not None:  # converted tiny models are shared with the test session
        env.update(BLENDERBOT_CT2_DIR=str(CT2_DIR))
    env.update(extra)
    return env
