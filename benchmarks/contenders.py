"""One benchmark contender in its own process, so its memory is its own.

`python benchmarks/contenders.py KIND MODEL_DIR BEAMS` loads what KIND needs,
prints one JSON line `{"ready": ...}`, then answers JSON commands read from
stdin, one JSON line each, until stdin closes. bench.py drives it.

KIND is `seed` (the model loaded inside every request), `naive` (fp32, loaded
once, one request at a time behind a lock) or `engine` (bot.engine.ReplyEngine
with default settings). Every contender turns a prompt into the same input ids
(bot.prompt.encode_turns) and generates exactly NEW_TOKENS new tokens.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEW_TOKENS = 32


def main() -> None:
    kind, model_dir, beams = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(serve(kind, model_dir, beams))


async def serve(kind: str, model_dir: str, beams: int) -> None:
    contender = {"seed": SeedStyle, "naive": NaiveServer, "engine": Engine}[kind](model_dir, beams)
    await contender.start()
    _send({"ready": True})
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        result = await getattr(contender, command.pop("op"))(**command)
        _send(result)
    await contender.close()


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _load(model_dir: str):
    """The fp32 model and tokenizer, loaded the way most example code does it."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    return model, tokenizer


def _input_ids(tokenizer, model, prompt: str):
    import torch

    from bot.prompt import FAMILIES, encode_turns

    family = FAMILIES[model.config.model_type]
    ids = encode_turns(tokenizer, family, [prompt], int(model.config.max_position_embeddings))
    return torch.tensor([ids])


def _generate_one(model, tokenizer, prompt: str, beams: int) -> int:
    import torch

    with torch.inference_mode():
        output = model.generate(
            input_ids=_input_ids(tokenizer, model, prompt),
            min_new_tokens=NEW_TOKENS,
            max_new_tokens=NEW_TOKENS,
            min_length=0,
            num_beams=beams,
        )
    tokenizer.decode(output[0], skip_special_tokens=True)
    return int(output.shape[1]) - 1  # minus the decoder start token


class Serial:
    """Requests served one at a time in arrival order. All `prompts` arrive at
    once; the first `limit` are really served and the rest of the queue is
    extrapolated from their service times (request i waits for all before it),
    which is exactly what a one-at-a-time server does, minus the waiting."""

    def __init__(self, model_dir: str, beams: int) -> None:
        self.model_dir, self.beams = model_dir, beams
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def serve_one(self, prompt: str) -> int:
        raise NotImplementedError

    async def run(self, prompts: list[str], limit: int) -> dict:
        started = time.perf_counter()
        served = prompts[:limit]

        async def request(prompt: str) -> tuple[float, int]:
            async with self.lock:
                tokens = await self.serve_one(prompt)
            return time.perf_counter() - started, tokens

        done = await asyncio.gather(*(request(p) for p in served))
        finished = [t for t, _ in done]
        service = [b - a for a, b in zip([0.0] + finished, finished)]
        latencies = list(finished)
        while len(latencies) < len(prompts):
            latencies.append(latencies[-1] + service[len(latencies) % len(service)])
        tokens = [n for _, n in done]
        return {
            "latencies": latencies,
            "wall": latencies[-1],
            "tokens": sum(tokens) * len(prompts) / len(served),
            "replies": len(prompts),
            "extrapolated": len(served) < len(prompts),
        }


class SeedStyle(Serial):
    """The project this grew from: load the model inside every request."""

    async def start(self) -> None:
        import transformers  # noqa: F401  (a running server has its imports done)

    async def serve_one(self, prompt: str) -> int:
        def work() -> int:
            model, tokenizer = _load(self.model_dir)
            tokens = _generate_one(model, tokenizer, prompt, self.beams)
            del model
            gc.collect()
            return tokens

        return await asyncio.to_thread(work)


class NaiveServer(Serial):
    """Loaded once at start-up, fp32, one request at a time behind a lock."""

    async def start(self) -> None:
        self.model, self.tokenizer = await asyncio.to_thread(_load, self.model_dir)
        await self.serve_one("Hello!")  # warm-up, as the engine does at start-up

    async def serve_one(self, prompt: str) -> int:
        return await asyncio.to_thread(_generate_one, self.model, self.tokenizer, prompt, self.beams)

    async def fidelity(self, prompts: list[str]) -> dict:
        """Cosine similarity of int8 and fp32 next-token logits on the same inputs:
        each prompt, teacher-forced with the fp32 model's own greedy reply."""
        return await asyncio.to_thread(self._fidelity, prompts)

    def _fidelity(self, prompts: list[str]) -> dict:
        import copy

        import torch

        from bot.model import quantize_int8

        fp32 = self.model
        int8 = quantize_int8(copy.deepcopy(fp32))
        cosines = []
        with torch.inference_mode():
            for prompt in prompts:
                ids = _input_ids(self.tokenizer, fp32, prompt)
                reply = fp32.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, num_beams=1)
                a = fp32(input_ids=ids, decoder_input_ids=reply).logits[0]
                b = int8(input_ids=ids, decoder_input_ids=reply).logits[0]
                cosines += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
        del int8
        gc.collect()
        return {"mean": sum(cosines) / len(cosines), "min": min(cosines), "positions": len(cosines)}


class Engine:
    """The reply engine with default settings, through `ReplyEngine.reply`."""

    def __init__(self, model_dir: str, beams: int) -> None:
        from bot.config import Settings

        self.settings = Settings(
            model=model_dir,
            memory_url="memory://",
            num_beams=beams,
            min_new_tokens=NEW_TOKENS,
            max_new_tokens=NEW_TOKENS,
        )
        self.runs = 0

    async def start(self) -> None:
        from bot.engine import ReplyEngine
        from bot.memory import open_store
        from bot.model import load_chat_model

        self.model = await asyncio.to_thread(load_chat_model, self.settings)
        store = open_store("memory://", max_turns=self.settings.memory_max_turns, ttl=self.settings.memory_ttl)
        self.engine = ReplyEngine(self.model, store, self.settings)
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    async def run(self, prompts: list[str], limit: int) -> dict:
        self.runs += 1
        started = time.perf_counter()

        async def request(i: int, prompt: str) -> float:
            # A fresh conversation each time, so every contender sees the same input.
            await self.engine.reply(f"bench-{self.runs}-{i}", prompt)
            return time.perf_counter() - started

        retried = self._safety_retries()
        latencies = list(await asyncio.gather(*(request(i, p) for i, p in enumerate(prompts))))
        # min = max new tokens: every reply is exactly NEW_TOKENS long (the engine's
        # own counter leaves out the forced end-of-sequence token).
        tokens = len(prompts) * NEW_TOKENS
        return {
            "latencies": latencies, "wall": max(latencies), "tokens": tokens, "replies": len(prompts),
            "extrapolated": False, "safety_retries": self._safety_retries() - retried,
        }  # fmt: skip

    def _safety_retries(self) -> int:
        """Replies the safety filter sent back for a sampled second try (random
        weights say odd things): each costs the engine one more generation."""
        registry = self.engine.metrics.registry
        return int(registry.get_sample_value("blenderchat_safety_blocked_total", {"direction": "output"}) or 0)

    async def raw(self, prompts: list[str]) -> dict:
        """One raw batched `generate` over the same prompts and the same model,
        without the engine: the yardstick for the engine's overhead."""
        import torch

        from bot.prompt import pad_right

        def work() -> dict:
            rows = [self.model.encode([p]) for p in prompts]
            ids, mask = pad_right(rows, self.model.tokenizer.pad_token_id)
            started = time.perf_counter()
            with torch.inference_mode():
                output = self.model.model.generate(
                    input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **self.model.generation_kwargs
                )
            wall = time.perf_counter() - started
            return {"wall": wall, "tokens": len(prompts) * (int(output.shape[1]) - 1)}

        return await asyncio.to_thread(work)

    async def decode(self, prompt: str) -> dict:
        """Single-stream decode speed of the engine's model, without the encoder
        and set-up: (time for 32 new tokens - time for 2) / 30, best of 3, and the
        bytes the decoder reads per token."""
        import torch

        def timed(new: int) -> float:
            ids = _input_ids(self.model.tokenizer, self.model.model, prompt)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                with torch.inference_mode():
                    self.model.model.generate(
                        input_ids=ids, min_new_tokens=new, max_new_tokens=new, min_length=0, num_beams=1
                    )
                best = min(best, time.perf_counter() - started)
            return best

        def work() -> dict:
            per_token = (timed(NEW_TOKENS) - timed(2)) / (NEW_TOKENS - 2)
            return {"seconds_per_token": per_token, "decoder_bytes_per_token": decoder_bytes_per_token(self.model.model)}

        return await asyncio.to_thread(work)

    async def rss(self) -> dict:
        gc.collect()
        import psutil

        return {"rss": psutil.Process().memory_info().rss}


def decoder_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every decoder layer except the
    cross-attention keys and values (computed once per reply and cached), plus
    the output projection. Quantized Linear weights count one byte per value."""
    import torch

    total = 0
    for name, module in list(model.model.decoder.named_modules()) + [("lm_head", model.lm_head)]:
        if "encoder_attn.k_proj" in name or "encoder_attn.v_proj" in name:
            continue
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = module._weight_bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
        elif isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


if __name__ == "__main__":
    main()
