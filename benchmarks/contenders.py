"""One benchmark contender in its own process, so its memory is its own.

`python benchmarks/contenders.py KIND MODEL_DIR BEAMS` loads what KIND needs,
prints one JSON line `{"ready": ...}`, then answers JSON commands read from
stdin, one JSON line each, until stdin closes. bench.py drives it.

KIND is `seed` (the model loaded inside every request), `naive` (fp32, loaded
once, one request at a time behind a lock), `engine` (bot.engine.ReplyEngine
with default settings: CTranslate2 on CPU) or `engine-transformers` (the same
engine on the transformers runtime, as before CTranslate2). A request is a
conversation, its turns oldest first (benchmarks/workloads.py): every
contender turns it into the same input ids (bot.prompt.encode_turns); the
engines get the history through their memory, as a real conversation reaches
them. Every reply is exactly NEW_TOKENS new tokens.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import NEW_TOKENS  # noqa: E402


def main() -> None:
    kind, model_dir, beams = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(serve(kind, model_dir, beams))


async def serve(kind: str, model_dir: str, beams: int) -> None:
    contenders = {"seed": SeedStyle, "naive": NaiveServer, "engine": Engine, "engine-transformers": Engine,
                  "engine-2x2": Engine}  # fmt: skip
    contender = contenders[kind](model_dir, beams, kind)
    await contender.start()
    _send({"ready": getattr(contender, "description", kind)})
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


def _input_ids(tokenizer, model, turns: list[str]):
    import torch

    from bot.prompt import FAMILIES, encode_turns

    family = FAMILIES[model.config.model_type]
    ids = encode_turns(tokenizer, family, turns, int(model.config.max_position_embeddings))
    return torch.tensor([ids])


def _generate_one(model, tokenizer, turns: list[str], beams: int) -> int:
    import torch

    with torch.inference_mode():
        output = model.generate(
            input_ids=_input_ids(tokenizer, model, turns),
            min_new_tokens=NEW_TOKENS,
            max_new_tokens=NEW_TOKENS,
            min_length=0,
            num_beams=beams,
        )
    tokenizer.decode(output[0], skip_special_tokens=True)
    return int(output.shape[1]) - 1  # minus the decoder start token


class Serial:
    """Requests served one at a time in arrival order. All conversations arrive
    at once; the first `limit` are really served and the rest of the queue is
    extrapolated from their service times (request i waits for all before it),
    which is exactly what a one-at-a-time server does, minus the waiting."""

    def __init__(self, model_dir: str, beams: int, kind: str) -> None:
        self.model_dir, self.beams = model_dir, beams
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def serve_one(self, turns: list[str]) -> int:
        raise NotImplementedError

    async def run(self, conversations: list[list[str]], limit: int) -> dict:
        started = time.perf_counter()
        served = conversations[:limit]

        async def request(turns: list[str]) -> tuple[float, int]:
            async with self.lock:
                tokens = await self.serve_one(turns)
            return time.perf_counter() - started, tokens

        done = await asyncio.gather(*(request(turns) for turns in served))
        finished = [t for t, _ in done]
        service = [b - a for a, b in zip([0.0] + finished, finished)]
        latencies = list(finished)
        while len(latencies) < len(conversations):
            latencies.append(latencies[-1] + service[len(latencies) % len(service)])
        tokens = [n for _, n in done]
        return {
            "latencies": latencies,
            "wall": latencies[-1],
            "tokens": sum(tokens) * len(conversations) / len(served),
            "replies": len(conversations),
            "extrapolated": len(served) < len(conversations),
        }


class SeedStyle(Serial):
    """The project this grew from: load the model inside every request."""

    async def start(self) -> None:
        import transformers  # noqa: F401  (a running server has its imports done)

    async def serve_one(self, turns: list[str]) -> int:
        def work() -> int:
            model, tokenizer = _load(self.model_dir)
            tokens = _generate_one(model, tokenizer, turns, self.beams)
            del model
            gc.collect()
            return tokens

        return await asyncio.to_thread(work)


class NaiveServer(Serial):
    """Loaded once at start-up, fp32, one request at a time behind a lock."""

    async def start(self) -> None:
        self.model, self.tokenizer = await asyncio.to_thread(_load, self.model_dir)
        await self.serve_one(["Hello!"])  # warm-up, as the engine does at start-up

    async def serve_one(self, turns: list[str]) -> int:
        return await asyncio.to_thread(_generate_one, self.model, self.tokenizer, turns, self.beams)

    async def fidelity(self, conversations: list[list[str]]) -> dict:
        """Cosine similarity of int8 and fp32 next-token logits on the same inputs
        (transformers): each conversation, teacher-forced with the fp32 model's
        own greedy reply."""
        return await asyncio.to_thread(self._fidelity, conversations)

    def _fidelity(self, conversations: list[list[str]]) -> dict:
        import copy

        import torch

        from bot.transformers_model import quantize_int8

        fp32 = self.model
        int8 = quantize_int8(copy.deepcopy(fp32))
        cosines = []
        with torch.inference_mode():
            for turns in conversations:
                ids = _input_ids(self.tokenizer, fp32, turns)
                reply = fp32.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, num_beams=1)
                a = fp32(input_ids=ids, decoder_input_ids=reply).logits[0]
                b = int8(input_ids=ids, decoder_input_ids=reply).logits[0]
                cosines += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
        del int8
        gc.collect()
        return {"mean": sum(cosines) / len(cosines), "min": min(cosines), "positions": len(cosines)}


class RawCalls:
    """Records the seconds of every call of the runtime's own generate
    (CTranslate2's `translate_batch`, transformers' `generate`), for the engine's
    overhead: a reply's time minus the time inside these calls."""

    def __init__(self, chat_model) -> None:
        self.seconds: list[float] = []
        if hasattr(chat_model, "translator"):
            self._real = chat_model.translator.translate_batch
            chat_model.translator = self  # ctranslate2.Translator's methods cannot be replaced on it
            self.translator = self._real.__self__
        else:
            self._real = chat_model.model.generate
            chat_model.model.generate = self._call

    def translate_batch(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):  # score_batch and the rest of the translator
        return getattr(self.translator, name)

    def _call(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._real(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - started)


class Engine:
    """The reply engine with default settings, through `ReplyEngine.reply`;
    `engine-transformers` on the transformers runtime; `engine-2x2` with CTranslate2's
    two workers of two threads each (BLENDERBOT_THREADS=4; issue 24's thread layout)."""

    def __init__(self, model_dir: str, beams: int, kind: str) -> None:
        from bot.config import load_settings

        environ = {
            "BLENDERBOT_MODEL": model_dir, "MEMORY_URL": "memory://", "BLENDERBOT_NUM_BEAMS": str(beams),
            "BLENDERBOT_MIN_NEW_TOKENS": str(NEW_TOKENS), "BLENDERBOT_MAX_NEW_TOKENS": str(NEW_TOKENS),
            "BLENDERBOT_CT2_DIR": str(Path(model_dir).parent / "ctranslate2"), "RATE_LIMIT_PER_MINUTE": "0",
        }  # fmt: skip
        if kind == "engine-transformers":
            environ["BLENDERBOT_RUNTIME"] = "transformers"
        if kind == "engine-2x2":
            environ["BLENDERBOT_THREADS"] = "4"  # thread_split(4): two workers of two threads
        self.settings = load_settings(environ, dotenv=False)
        self.runs = 0

    async def start(self) -> None:
        from bot.engine import ReplyEngine
        from bot.memory import open_store
        from bot.model import load_chat_model

        self.model = await asyncio.to_thread(load_chat_model, self.settings)
        self.description = self.model.description
        self.raw = RawCalls(self.model)
        self.store = open_store("memory://", max_turns=self.settings.memory_max_turns, ttl=self.settings.memory_ttl)
        self.engine = ReplyEngine(self.model, self.store, self.settings)
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    async def _remember(self, conversation: str, turns: list[str]) -> None:
        """The conversation's history into the engine's memory, as earlier exchanges left it."""
        for user, bot in zip(turns[:-1:2], turns[1::2]):
            await self.store.append_exchange(conversation, user, bot)

    async def run(self, conversations: list[list[str]], limit: int) -> dict:
        self.runs += 1
        ids = [f"bench-{self.runs}-{i}" for i in range(len(conversations))]
        for conversation, turns in zip(ids, conversations):
            await self._remember(conversation, turns)
        retried = self._safety_retries()
        started = time.perf_counter()

        async def request(conversation: str, turns: list[str]) -> float:
            await self.engine.reply(conversation, turns[-1])
            return time.perf_counter() - started

        latencies = list(await asyncio.gather(*(request(c, t) for c, t in zip(ids, conversations))))
        # min = max new tokens: every reply is exactly NEW_TOKENS long (the engine's
        # own counter leaves out the forced end-of-sequence token).
        return {
            "latencies": latencies, "wall": max(latencies), "tokens": len(conversations) * NEW_TOKENS,
            "replies": len(conversations), "extrapolated": False, "safety_retries": self._safety_retries() - retried,
        }  # fmt: skip

    def _safety_retries(self) -> int:
        """Replies the safety filter sent back for a sampled second try (random
        weights say odd things): each costs the engine one more generation."""
        registry = self.engine.metrics.registry
        return int(registry.get_sample_value("blenderchat_safety_blocked_total", {"direction": "output"}) or 0)

    async def overhead(self, conversations: dict[str, list[str]], rounds: int = 3) -> dict:
        """The engine's own time on lone replies: each reply's wall time minus the
        time spent inside the runtime's raw generate call(s) during it, median of
        `rounds` per conversation (a safety retry's second call counts as raw)."""
        out = {}
        for name, turns in conversations.items():
            replies, raws = [], []
            for _ in range(rounds):
                self.runs += 1
                conversation = f"overhead-{self.runs}"
                await self._remember(conversation, turns)
                self.raw.seconds.clear()
                started = time.perf_counter()
                await self.engine.reply(conversation, turns[-1])
                replies.append(time.perf_counter() - started)
                raws.append(sum(self.raw.seconds))
            reply, raw = statistics.median(replies), statistics.median(raws)
            out[name] = {"reply_s": reply, "raw_s": raw, "overhead_s": reply - raw, "ratio": (reply - raw) / raw}
        return out

    async def decode(self, turns: list[str]) -> dict:
        """Single-stream decode speed without the encoder and set-up: (time for 32
        new tokens - time for 2) / 30, best of 3, through the runtime's raw call."""

        def timed(new: int) -> float:
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                self._raw_decode(turns, new)
                best = min(best, time.perf_counter() - started)
            return best

        def work() -> dict:
            per_token = (timed(NEW_TOKENS) - timed(2)) / (NEW_TOKENS - 2)
            return {"seconds_per_token": per_token, "decoder_bytes_per_token": decoder_bytes_per_token(self.model)}

        return await asyncio.to_thread(work)

    def _raw_decode(self, turns: list[str], new: int) -> None:
        ids = self.model.encode(turns)
        if hasattr(self.model, "translator"):
            tokens = [self.model.vocabulary[i] for i in ids]
            self.model.translator.translate_batch([tokens], beam_size=1, min_decoding_length=new, max_decoding_length=new)
            return
        import torch

        with torch.inference_mode():
            self.model.model.generate(
                input_ids=torch.tensor([ids]), min_new_tokens=new, max_new_tokens=new, min_length=0, num_beams=1
            )

    async def rss(self) -> dict:
        gc.collect()
        import psutil

        from bot.chat_model import release_free_memory

        release_free_memory()
        return {"rss": psutil.Process().memory_info().rss}


def decoder_bytes_per_token(chat_model) -> int:
    """Bytes of int8 weights one decoding step reads (checkpoint.decoder_bytes_per_token)."""
    from checkpoint import decoder_bytes_per_token as from_config

    config = chat_model.config if hasattr(chat_model, "config") else chat_model.model.config.to_dict()
    return from_config(config)


if __name__ == "__main__":
    main()
