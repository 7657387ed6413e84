"""The CTranslate2 runtime's life cycle: converting once into the cache and
reusing it, the cache key, `auto`'s fallback to transformers and an explicit
`ctranslate2` that cannot work, `blender-chat download` converting, and
serving without torch."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from bot_process import BotProcess, http, port_env
from conftest import REPO, RUNTIMES, subprocess_env
from tiny_models import build_blenderbot

from bot.chat_model import ModelLoadError
from bot.config import load_settings
from bot.ct2_convert import checkpoint_id, converted_dir
from bot.model import load_chat_model

CONVERTING = "for CTranslate2 (int8) into"


def conversions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bot.ct2_convert" and "Converting" in r.getMessage()]


def test_a_checkpoint_is_converted_once_with_a_log_line_and_reused(blenderbot_dir, make_settings, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = make_settings(ct2_dir=tmp_path / "ct2", runtime="ctranslate2")
    first = load_chat_model(settings)
    [line] = conversions(caplog)
    assert CONVERTING in line and str(blenderbot_dir) in line
    assert first.path.parent == tmp_path / "ct2" and (first.path / "model.bin").is_file()
    # Nothing half-built left; beside the model only its (empty) lock file, which stays for the next conversion.
    assert sorted(p.name for p in (tmp_path / "ct2").iterdir()) == [first.path.name, first.path.name + ".lock"]

    caplog.clear()
    again = load_chat_model(settings)
    assert conversions(caplog) == [] and again.path == first.path
    assert again.generate([["hello"]]) == first.generate([["hello"]])


def test_the_cache_key_is_the_content_the_quantization_and_the_versions(blenderbot_dir, tmp_path):
    copy = shutil.copytree(blenderbot_dir, tmp_path / "copy")
    source = checkpoint_id(str(blenderbot_dir), blenderbot_dir)
    assert source.startswith("sha256:") and checkpoint_id(str(copy), copy) == source  # content, not place

    generation = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**generation, "num_beams": 3}))
    assert checkpoint_id(str(copy), copy) != source

    cache = tmp_path / "cache"
    base = converted_dir(cache, "m", source, "int8")
    assert base.parent == cache and base.name.startswith("m-int8-")
    assert converted_dir(cache, "m", source, "int8") == base
    assert converted_dir(cache, "m", source, "float32") != base
    assert converted_dir(cache, "m", "sha256:other", "int8") != base

    snapshot = tmp_path / "hub" / "models--facebook--blenderbot" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    assert checkpoint_id("facebook/blenderbot", snapshot) == "facebook/blenderbot@" + "ab" * 20  # the revision


def test_a_new_ctranslate2_or_converter_version_converts_again(blenderbot_dir, tmp_path, monkeypatch):
    import ctranslate2

    import bot.ct2_convert

    source = checkpoint_id(str(blenderbot_dir), blenderbot_dir)
    before = converted_dir(tmp_path, "m", source, "int8")
    monkeypatch.setattr(ctranslate2, "__version__", "4.99.0")
    after_upgrade = converted_dir(tmp_path, "m", source, "int8")
    monkeypatch.setattr(bot.ct2_convert, "CONVERTER_VERSION", bot.ct2_convert.CONVERTER_VERSION + 1)
    assert len({before, after_upgrade, converted_dir(tmp_path, "m", source, "int8")}) == 3


def test_a_damaged_conversion_in_the_cache_is_built_again(make_settings, tmp_path, caplog):
    settings = make_settings(ct2_dir=tmp_path / "ct2", runtime="ctranslate2")
    path = load_chat_model(settings).path
    (path / "model.bin").write_bytes(b"half a file")
    caplog.set_level(logging.INFO)
    model = load_chat_model(settings)
    assert "converting again" in caplog.text and len(conversions(caplog)) == 1
    assert model.generate([["hello"]])[0].new_tokens > 0


@pytest.fixture(scope="module")
def unconvertible_dir(tmp_path_factory) -> Path:
    """A BlenderBot that transformers runs and CTranslate2 cannot: an activation it lacks."""
    directory = build_blenderbot(tmp_path_factory.mktemp("tanh-blenderbot"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "activation_function": "tanh"}))
    return directory


def test_auto_falls_back_to_transformers_with_one_log_line(unconvertible_dir, make_settings, caplog):
    caplog.set_level(logging.INFO)
    model = load_chat_model(make_settings(model=str(unconvertible_dir), runtime="auto", device="cpu"))
    assert model.description.startswith("transformers")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "CTranslate2 cannot serve" in warnings[0].getMessage() and "tanh" in warnings[0].getMessage()
    assert "using transformers instead" in warnings[0].getMessage()
    assert model.generate([["hello"]])[0].new_tokens > 0


def test_an_explicit_ctranslate2_that_cannot_work_is_one_clear_error(unconvertible_dir, make_settings):
    with pytest.raises(ModelLoadError) as error:
        load_chat_model(make_settings(model=str(unconvertible_dir), runtime="ctranslate2"))
    message = str(error.value)
    assert message.startswith("BLENDERBOT_RUNTIME=ctranslate2 cannot serve") and "tanh" in message and "\n" not in message


def test_an_explicit_ctranslate2_that_cannot_work_stops_start_up_with_one_line(unconvertible_dir, tmp_path):
    env = subprocess_env(BLENDERBOT_MODEL=str(unconvertible_dir), BLENDERBOT_RUNTIME="ctranslate2", LOG_LEVEL="WARNING")
    result = subprocess.run(
        [sys.executable, "-m", "bot", "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("blender-chat: BLENDERBOT_RUNTIME=ctranslate2 cannot serve")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value", [("suppress_tokens", [5]), ("bad_words_ids", [[7, 8]])])
def test_a_generation_option_ctranslate2_cannot_honour_means_transformers(blenderbot_dir, tmp_path, make_settings, caplog, option, value):
    directory = shutil.copytree(blenderbot_dir, tmp_path / "model")
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({**generation, option: value}))
    caplog.set_level(logging.WARNING)
    model = load_chat_model(make_settings(model=str(directory), runtime="auto", device="cpu", num_beams=None))
    assert model.description.startswith("transformers") and option in caplog.text
    with pytest.raises(ModelLoadError, match=f"cannot honour the checkpoint's generation option {option}="):
        load_chat_model(make_settings(model=str(directory), runtime="ctranslate2"))


def test_runtime_settings():
    assert load_settings({}, dotenv=False).runtime == "auto"
    assert load_settings({"BLENDERBOT_RUNTIME": "CTranslate2"}, dotenv=False).runtime == "ctranslate2"
    assert load_settings({}, dotenv=False).ct2_dir == Path("data/ctranslate2")
    assert load_settings({"DATA_DIR": "/srv/bot"}, dotenv=False).ct2_dir == Path("/srv/bot/ctranslate2")
    assert load_settings({"BLENDERBOT_CT2_DIR": "/cache/ct2"}, dotenv=False).ct2_dir == Path("/cache/ct2")


def download(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "download"], env=subprocess_env(LOG_LEVEL="INFO", **env), cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def converted_models(cache: Path) -> list[Path]:
    """The converted models in the cache (not the lock files beside them)."""
    return [p for p in cache.iterdir() if p.is_dir()]


def fake_hub_cache(home: Path, repo: str, directory: Path, revision: str) -> None:
    """`directory` as the Hugging Face cache keeps a hub snapshot of `repo`, so
    it is served offline exactly as a downloaded hub model is."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(directory, root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)


def test_download_converts_a_cached_hub_model_keyed_by_its_revision(blenderbot_dir, tmp_path):
    fake_hub_cache(tmp_path / "hf", "facebook/blenderbot-tiny", blenderbot_dir, "1" * 40)
    env = dict(HF_HOME=str(tmp_path / "hf"), BLENDERBOT_MODEL="facebook/blenderbot-tiny", BLENDERBOT_CT2_DIR=str(tmp_path / "ct2"))
    first = download(tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert "Downloaded facebook/blenderbot-tiny" in first.stdout and "CTranslate2 model of facebook/blenderbot-tiny" in first.stdout
    assert "Converting facebook/blenderbot-tiny for CTranslate2 (int8)" in first.stderr
    [converted] = converted_models(tmp_path / "ct2")

    second = download(tmp_path, **env)
    assert second.returncode == 0 and "Converting" not in second.stderr and str(converted) in second.stdout

    # A new revision of the hub model is converted again.
    fake_root = tmp_path / "hf" / "hub" / "models--facebook--blenderbot-tiny"
    shutil.copytree(fake_root / "snapshots" / ("1" * 40), fake_root / "snapshots" / ("2" * 40))
    (fake_root / "refs" / "main").write_text("2" * 40)
    third = download(tmp_path, **env)
    assert third.returncode == 0 and "Converting" in third.stderr and len(converted_models(tmp_path / "ct2")) == 2

    # The run uses the converted model without converting.
    chat = subprocess.run(
        # DEBUG: the terminal chat shows only warnings otherwise, and the test reads the log.
        [sys.executable, "-m", "bot", "chat"], input="hello\n/quit\n", env=subprocess_env(LOG_LEVEL="DEBUG", **env),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert chat.returncode == 0 and "bot> " in chat.stdout
    assert "Converting" not in chat.stderr and "ctranslate2" in chat.stderr


def test_download_of_a_local_directory_converts_it_and_transformers_skips_that(blenderbot_dir, tmp_path):
    result = download(tmp_path, BLENDERBOT_MODEL=str(blenderbot_dir), BLENDERBOT_CT2_DIR=str(tmp_path / "ct2"))
    assert result.returncode == 0, result.stderr
    assert "nothing to download" in result.stdout and "CTranslate2 model of" in result.stdout
    assert len(converted_models(tmp_path / "ct2")) == 1
    skipped = download(tmp_path, BLENDERBOT_MODEL=str(blenderbot_dir), BLENDERBOT_CT2_DIR=str(tmp_path / "ct2b"),
                       BLENDERBOT_RUNTIME="transformers")  # fmt: skip
    assert skipped.returncode == 0 and "CTranslate2" not in skipped.stdout and not (tmp_path / "ct2b").exists()


def test_download_that_cannot_convert_says_so_and_run_will_use_transformers(unconvertible_dir, tmp_path):
    result = download(tmp_path, BLENDERBOT_MODEL=str(unconvertible_dir), BLENDERBOT_CT2_DIR=str(tmp_path / "ct2"))
    assert result.returncode == 0 and "will use transformers instead" in result.stderr and "Traceback" not in result.stderr
    strict = download(tmp_path, BLENDERBOT_MODEL=str(unconvertible_dir), BLENDERBOT_CT2_DIR=str(tmp_path / "ct2"),
                      BLENDERBOT_RUNTIME="ctranslate2")  # fmt: skip
    assert strict.returncode == 1 and "tanh" in strict.stderr and "Traceback" not in strict.stderr


def test_serving_with_ctranslate2_does_not_import_torch(make_settings, tmp_path):
    """torch costs ~0.2 GB of memory: a converted model is served without it."""
    settings = make_settings(ct2_dir=tmp_path / "ct2")
    load_chat_model(replace(settings, runtime="ctranslate2"))  # converts (that needs torch), here
    script = (
        "import sys; from pathlib import Path; from bot.config import Settings; from bot.model import load_chat_model; "
        f"m = load_chat_model(Settings(model={settings.model!r}, ct2_dir=Path({str(settings.ct2_dir)!r}))); "
        "print(m.description, m.generate([['hello']])[0].new_tokens > 0, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ctranslate2") and result.stdout.split()[-2:] == ["True", "False"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_and_chat_answer_on_either_runtime(blenderbot_dir, tmp_path, runtime):
    env = dict(
        BLENDERBOT_MODEL=str(blenderbot_dir), BLENDERBOT_RUNTIME=runtime, BLENDERBOT_MAX_NEW_TOKENS="6",
        BLENDERBOT_NUM_BEAMS="1", MEMORY_URL=f"sqlite:///{tmp_path / 'memory.db'}",
    )  # fmt: skip
    process = BotProcess(tmp_path / "bot.log", **env, **port_env())
    try:
        process.wait_ready()
        status, _, body = http("POST", process.base + "/api/chat", {"conversation": "c", "text": "hello there"})
        assert status == 200 and body["reply"].strip()
        assert f"({runtime}" in process.log  # "Loaded ... (ctranslate2 4.x, ...)" / "(transformers, ...)"
    finally:
        process.close()
    chat = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--conversation", "web:c"], input="and how are you?\n/quit\n",
        # DEBUG: the terminal chat shows only warnings otherwise, and the test reads which runtime loaded.
        env=subprocess_env(**env, LOG_LEVEL="DEBUG"), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "1 earlier exchange remembered" in chat.stdout and "bot> " in chat.stdout and f"({runtime}" in chat.stderr
