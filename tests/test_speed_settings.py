"""Speed settings: int8 quantization per setting, runtime and device, half
precision on GPU, the threads setting, batch row caps on both runtimes, and the
benchmark's `--smoke` run end to end."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import REPO, RUNTIMES, subprocess_env

from bot.chat_model import ModelLoadError, default_threads
from bot.config import ConfigError, load_settings
from bot.model import load_chat_model
from bot.transformers_model import quantize_int8, resolve_dtype, should_quantize

QuantizedLinear = torch.ao.nn.quantized.dynamic.Linear
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def keep_threads():
    """Loading a model sets torch's thread count for the whole process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def linear_kinds(model: torch.nn.Module) -> tuple[int, int]:
    modules = list(model.modules())
    quantized = sum(isinstance(m, QuantizedLinear) for m in modules)
    plain = sum(type(m) is torch.nn.Linear for m in modules)
    return quantized, plain


@pytest.mark.parametrize("setting, quantized", [("auto", True), ("int8", True), ("none", False)])
def test_quantization_on_cpu_follows_the_setting(make_settings, keep_threads, setting, quantized):
    chat_model = load_chat_model(make_settings(device="cpu", quantize=setting, runtime="transformers"))

    int8_layers, fp32_layers = linear_kinds(chat_model.model)
    assert chat_model.quantized is quantized
    if quantized:
        assert int8_layers > 0 and fp32_layers == 0
    else:
        assert int8_layers == 0 and fp32_layers > 0
    [answer] = chat_model.generate([["Hello there, how are you?"]])
    assert answer.new_tokens > 0


@pytest.mark.parametrize("setting, stored, computed", [("auto", "int8", "int8"), ("int8", "int8", "int8"), ("none", "float32", "float32")])
def test_ctranslate2_precision_on_cpu_follows_the_setting(make_settings, setting, stored, computed):
    chat_model = load_chat_model(make_settings(device="cpu", quantize=setting, runtime="ctranslate2"))
    assert f", cpu, {computed}, " in chat_model.description
    config = json.loads((chat_model.path / "config.json").read_text())
    assert f"-{stored}-" in chat_model.path.name and config["decoder_start_token"] == "<s>"
    [answer] = chat_model.generate([["Hello there, how are you?"]])
    assert answer.new_tokens > 0


def test_settings_read_quantize_dtype_and_threads_from_the_environment():
    settings = load_settings({"BLENDERBOT_QUANTIZE": "INT8", "BLENDERBOT_DTYPE": "float16", "BLENDERBOT_THREADS": "3"}, dotenv=False)
    assert (settings.quantize, settings.dtype, settings.threads) == ("int8", "float16", 3)
    defaults = load_settings({}, dotenv=False)
    assert (defaults.quantize, defaults.dtype, defaults.threads) == ("auto", "auto", None)
    for name, value in [("BLENDERBOT_QUANTIZE", "fp4"), ("BLENDERBOT_THREADS", "0"), ("BLENDERBOT_DTYPE", "int8")]:
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value}, dotenv=False)


def test_on_a_gpu_auto_does_not_quantize_and_int8_is_refused_clearly():
    assert should_quantize("auto", CUDA) is False
    assert should_quantize("none", CUDA) is False
    with pytest.raises(ModelLoadError, match="CPU only") as error:
        should_quantize("int8", CUDA)
    assert "\n" not in str(error.value)


def test_half_precision_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    for setting in ("auto", "float32", "float16", "bfloat16"):
        assert resolve_dtype(setting, CPU) is torch.float32  # int8 is the CPU speed-up, not half precision
    assert resolve_dtype("float16", CUDA) is torch.float16
    assert resolve_dtype("bfloat16", CUDA) is torch.bfloat16
    assert resolve_dtype("float32", CUDA) is torch.float32
    # Which half precision a GPU supports cannot be asked of a machine without one.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", CUDA) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", CUDA) is torch.float16


def test_quantizing_frees_the_fp32_linear_weights(blenderbot_dir):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(blenderbot_dir).eval()
    originals = [m for m in model.modules() if type(m) is torch.nn.Linear]
    # The output projection shares its weight with the token embedding, which stays.
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    refs = [weakref.ref(m) for m in originals] + [weakref.ref(m.weight) for m in originals if id(m.weight) not in embeddings]
    assert len(refs) > len(originals)
    del originals

    quantize_int8(model)

    assert linear_kinds(model)[1] == 0
    assert [ref for ref in refs if ref() is not None] == []


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="memory maps are read from /proc (Linux)")
def test_a_quantized_model_does_not_keep_the_checkpoint_mapped(blenderbot_dir, tmp_path, make_settings, keep_threads):
    # A private copy, so no other test's model maps the same file.
    checkpoint = shutil.copytree(blenderbot_dir, tmp_path / "model")
    weights = str(checkpoint / "model.safetensors")

    int8 = load_chat_model(make_settings(model=str(checkpoint), quantize="int8", runtime="transformers"))
    assert weights not in Path("/proc/self/maps").read_text()
    assert int8.quantized


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_setting_is_honoured(make_settings, keep_threads, threads):
    load_chat_model(make_settings(threads=threads, runtime="transformers"))
    assert torch.get_num_threads() == threads
    assert f", {threads} threads" in load_chat_model(make_settings(threads=threads, runtime="ctranslate2")).description


def test_threads_default_to_the_cores_available(make_settings, keep_threads):
    torch.set_num_threads(1)
    load_chat_model(make_settings(threads=None, runtime="transformers"))
    assert torch.get_num_threads() == default_threads()
    ct2 = load_chat_model(make_settings(threads=None, runtime="ctranslate2"))
    assert f", {default_threads()} threads" in ct2.description


@pytest.mark.timeout(900)
def test_benchmark_smoke_run_writes_table_plot_and_json(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--smoke", "--out", str(out), "--cache", str(tmp_path / "cache"),
         "--concurrency", "1,8"],
        env=subprocess_env(), capture_output=True, text=True, timeout=880, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((out / "smoke.json").read_text())
    contenders = {"seed", "naive", "engine", "engine-transformers", "http"}
    measured = {(r["contender"], r["workload"], r["beams"], r["concurrency"]) for r in data["rows"]}
    assert measured == {(c, w, b, n) for c in contenders for w in ("short", "full") for b in (1, 10) for n in (1, 8)}
    for row in data["rows"]:
        assert row["replies_per_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert 0 < row["p50_s"] <= row["p95_s"] and row["load_average"] >= 0
    assert data["extras"]["descriptions"]["engine"].startswith("ctranslate2")
    assert data["extras"]["descriptions"]["engine-transformers"].startswith("transformers")
    assert 0.5 < data["extras"]["fidelity"]["mean"] <= 1.0001
    for engine in ("engine", "engine-transformers"):
        extras = data["extras"][engine]
        for beams in (1, 10):
            for workload in ("short", "full"):
                overhead = extras[f"overhead_beam{beams}"][workload]
                assert 0 < overhead["raw_s"] <= overhead["reply_s"]
        assert extras["decode"]["bandwidth_limit_tokens_per_s"] > 0 and extras["steady_rss_mb"] > 0
    assert {t["target"] for t in data["targets"]} and all("met" in t for t in data["targets"])
    assert "CTranslate2 model of" in result.stdout  # converted before the contenders started

    table = (out / "smoke.md").read_text()
    assert "| decoding | workload | conversations | contender | replies/s | tokens/s | p50 s | p95 s | peak RSS MB" in table
    assert "naive server" in table and "engine (ReplyEngine.reply, defaults)" in table and "## Targets" in table
    assert "full window" in table and "engine on transformers" in table
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class RowCounter:
    """Wraps a runtime's own generate call (transformers' `generate`, CTranslate2's
    `translate_batch`) and records the rows (conversations x beams) of each call."""

    def __init__(self, chat_model) -> None:
        self.calls: list[int] = []
        if hasattr(chat_model, "translator"):
            self.real = chat_model.translator.translate_batch
            chat_model.translator = self
        else:
            real = chat_model.model.generate

            def generate(**kwargs):
                self.calls.append(kwargs["input_ids"].shape[0] * kwargs.get("num_beams", 1))
                return real(**kwargs)

            chat_model.model.generate = generate

    def translate_batch(self, source, **options):
        self.calls.append(len(source) * options["beam_size"])
        return self.real(source, **options)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_beam_batches_are_split_to_stay_under_the_row_cap(make_settings, keep_threads, runtime):
    chat_model = load_chat_model(make_settings(num_beams=4, batch_max_rows=8, runtime=runtime))
    calls = RowCounter(chat_model).calls
    conversations = [[f"message number {i}, about {topic}"] for i, topic in enumerate(["dogs", "cats", "rain", "tea", "jazz"])]

    batched = chat_model.generate(conversations)

    # 2 + 2 + 1 conversations of 4 beams each (CTranslate2 may then decode one again alone:
    # see bot/ct2_model.py on encoder_no_repeat_ngram_size)
    assert calls[:3] == [8, 8, 4] and set(calls[3:]) <= {4}
    alone = [chat_model.generate([c])[0] for c in conversations]
    assert [g.text for g in batched] == [g.text for g in alone]  # every answer with its own conversation
    calls.clear()
    chat_model.generate(conversations, sample=True)  # sampling has one row per conversation
    assert calls[0] == 5 and set(calls[1:]) <= {1}


def test_batch_max_rows_setting():
    assert load_settings({}, dotenv=False).batch_max_rows == 80
    assert load_settings({"BATCH_MAX_ROWS": "40"}, dotenv=False).batch_max_rows == 40
    with pytest.raises(ConfigError, match="BATCH_MAX_ROWS"):
        load_settings({"BATCH_MAX_ROWS": "0"}, dotenv=False)


async def test_engine_batches_hold_at_most_max_rows_of_beams(make_settings, keep_threads):
    from bot.engine import ReplyEngine
    from bot.memory import open_store

    settings = make_settings(num_beams=4, batch_max_rows=8, batch_size=32)
    chat_model = load_chat_model(settings)
    batches = []
    real_generate = chat_model.generate

    def recording_generate(conversations, *, sample=False, personas=None):
        batches.append(len(conversations))
        return real_generate(conversations, sample=sample, personas=personas)

    chat_model.generate = recording_generate
    async with ReplyEngine(chat_model, open_store("memory://", max_turns=5), settings) as engine:
        answers = await asyncio.gather(*(engine.reply(f"c{i}", f"hello number {i}") for i in range(5)))

    assert len(answers) == 5 and all(answers)
    assert sum(batches) == 5 and max(batches) == 2  # 8 rows / 4 beams
