"""One bot replica for the multi-process tests: a `ReplyEngine` over the tiny
model, the Redis memory store, Redis conversation locks and Redis event
de-duplication, driven by JSON lines on stdin and answering JSON lines on stdout.

    python tests/replica.py MODEL_DIR REDIS_URL?prefix=... [--delay S] [--no-shared-lock]

Requests (each answered as soon as it is done, so several run at once; every
answer carries the request's "id"):
    {"op": "reply", "conversation": c, "text": t} -> {"answer": a, "seen": [turns the model got]}
    {"op": "dedupe", "key": k, "ttl": s}          -> {"first": bool}
    {"op": "ping"}                                -> {"ok": bool}
The first line written is {"ready": true}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from bot.chat_model import ChatModel, Generated
from bot.config import Settings
from bot.engine import ReplyEngine
from bot.locks import RedisLocks
from bot.memory import StoreUnavailable, open_store
from bot.model import load_chat_model
from bot.shared import RedisDedupeStore, connect, split_prefix


class RecordingModel:
    """The tiny model, slowed by `delay` per generate call (so replicas really
    overlap), remembering the turns each message was answered from."""

    def __init__(self, model: ChatModel, delay: float) -> None:
        self.model = model
        self.delay = delay
        self.seen: dict[str, list[str]] = {}  # last turn (the message) -> all turns

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        for turns in conversations:
            self.seen[turns[-1]] = list(turns)
        time.sleep(self.delay)
        return self.model.generate(conversations, sample=sample, personas=personas)

    def check_persona(self, persona: Sequence[str]) -> None:
        self.model.check_persona(persona)


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(model=args.model, memory_url=args.redis_url, memory_max_turns=50, memory_ttl=600,
                        max_new_tokens=6, num_beams=1, threads=1)  # fmt: skip
    model = RecordingModel(load_chat_model(settings), args.delay)
    url, prefix = split_prefix(args.redis_url)
    client = connect(url)
    locks = None if args.no_shared_lock else RedisLocks(client, prefix=prefix)
    dedupe = RedisDedupeStore(client, prefix=prefix)
    store = open_store(args.redis_url, max_turns=settings.memory_max_turns, ttl=settings.memory_ttl)
    out = sys.stdout

    def send(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    async def handle(request: dict) -> None:
        result: dict = {"id": request["id"]}
        if request["op"] == "reply":
            result["answer"] = await engine.reply(request["conversation"], request["text"])
            result["seen"] = model.seen[request["text"]]
        elif request["op"] == "dedupe":
            result["first"] = await dedupe.first_time(request["key"], request["ttl"])
        elif request["op"] == "ping":
            try:
                await store.ping()
                result["ok"] = True
            except StoreUnavailable:
                result["ok"] = False
        send(result)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    async with ReplyEngine(model, store, settings, shared_lock=locks) as engine:
        send({"ready": True})
        while line := await reader.readline():
            task = asyncio.create_task(handle(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("redis_url")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--no-shared-lock", action="store_true")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
