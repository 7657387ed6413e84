"""A wrapper around the real tiny model that lets a test hold, slow down or
fail `generate` calls and records every batch the engine sends. The model
still generates: only the timing and failures are the test's."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from bot.chat_model import ChatModel, Generated

# A reply a double gives where a test needs the model to say something harmless: the tiny model's
# own sampled text is random bytes that the safety classifier now and then flags (about 2% of
# samples), so a test whose outcome hangs on it would fail at random. test_safety checks this one.
SAFE_REPLY = "That sounds lovely, tell me more about it."


class GatedModel:
    def __init__(self, model: ChatModel) -> None:
        self.model = model
        self.batches: list[list[list[str]]] = []  # every generate call: its conversations' turns
        self.samples: list[bool] = []
        self.personas: list[list[tuple[str, ...]]] = []  # every generate call: its conversations' personas
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.failures = 0  # how many next calls raise
        # How many generate calls the engine may run at once (CTranslate2Model.workers): 1 unless
        # a test sets it, so batch composition does not depend on the machine's cores.
        self.workers = 1

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        self.batches.append([list(turns) for turns in conversations])
        self.samples.append(sample)
        self.personas.append([tuple(persona) for persona in personas or [()] * len(conversations)])
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("simulated CUDA out of memory")
        return self.model.generate(conversations, sample=sample, personas=personas)

    def check_persona(self, persona: Sequence[str]) -> None:
        self.model.check_persona(persona)

    def wait_for_calls(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.batches) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} generate calls, saw {len(self.batches)}")
            time.sleep(0.005)
