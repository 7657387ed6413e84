"""Compare offline profanity filters on chat lines: false positives, misses and speed.

Run by hand: `python benchmarks/safety_filters.py`. Compares alt-profanity-check
(the one the bot uses) with better-profanity when that is installed
(`pip install better-profanity`); detoxify is left out because it downloads its
checkpoint at first use and so cannot run offline. The results are in
README's "Why alt-profanity-check".
"""

from __future__ import annotations

import time
from collections.abc import Callable

HARMLESS = [
    "hello there, how are you?", "I love my cat", "I hate mondays", "I hate it when people are rude to me.",
    "shut the door please", "I am gay", "sex education", "hell yeah", "what a damn good pizza",
    "I want to kill this process", "Kill Bill is my favourite movie", "Scunthorpe is a town in England",
    "analysis of Dickens", "cock the gun", "I am a big fan of the killers, they are a great band.",
    "I don't like spiders, they scare me.", "That sounds like a lot of fun! What do you do for a living?",
    "I'm sorry to hear that. Do you have any pets?", "I was a bit drunk yesterday", "the assassin was classic",
]  # fmt: skip
OFFENSIVE = [
    "you are an idiot", "fuck you", "go kill yourself", "you suck", "bitch", "Go to hell", "f*ck you",
    "you are a terrible person", "Hitler was right", "women are inferior", "sh1t head", "you stupid moron",
]  # fmt: skip


def alt_profanity_check() -> Callable[[str], bool]:
    from profanity_check import predict_prob

    return lambda text: float(predict_prob([text])[0]) >= 0.5


def better_profanity() -> Callable[[str], bool]:
    from better_profanity import profanity

    profanity.load_censor_words()
    return profanity.contains_profanity


def measure(name: str, load: Callable[[], Callable[[str], bool]]) -> None:
    started = time.perf_counter()
    try:
        unsafe = load()
    except ImportError:
        print(f"{name}: not installed")
        return
    loaded = time.perf_counter() - started
    wrongly_flagged = [text for text in HARMLESS if unsafe(text)]
    missed = [text for text in OFFENSIVE if not unsafe(text)]
    short = _per_call(unsafe, "hello there, how are you doing today?", 100)
    long = _per_call(unsafe, ("hello world how are you " * 84)[:2000], 3)
    print(f"{name}: load {loaded:.2f}s, short message {short * 1000:.1f} ms, 2,000 characters {long * 1000:.0f} ms")
    print(f"  harmless flagged {len(wrongly_flagged)}/{len(HARMLESS)}: {wrongly_flagged}")
    print(f"  offensive caught {len(OFFENSIVE) - len(missed)}/{len(OFFENSIVE)}; missed: {missed}")


def _per_call(unsafe: Callable[[str], bool], text: str, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        unsafe(text)
    return (time.perf_counter() - started) / repeat


if __name__ == "__main__":
    measure("alt-profanity-check", alt_profanity_check)
    measure("better-profanity", better_profanity)
