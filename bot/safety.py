"""The safety filter: is a user's message or the model's reply fit to pass?

Two checks, either of which marks a text unsafe: the operator's block-list
(words or phrases, whole words, any case) and alt-profanity-check's offline
classifier (see README: why this library). The allow-list undoes false
positives of the classifier: its words and phrases are taken out of the text
before the classifier sees it (the classifier is a bag of words, so a harmless
word it dislikes, such as "hate", then no longer counts). It never overrides
the block-list.

`SafetyFilter.from_settings()` loads the classifier (about a second and a half:
the library unpickles its model on import), so it is called once at start-up,
on a thread, never at import time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bot.config import Settings

log = logging.getLogger(__name__)

Classifier = Callable[[Sequence[str]], Sequence[float]]  # texts -> probability each is offensive


class SafetyFilter:
    def __init__(
        self,
        *,
        classifier: Classifier | None = None,
        threshold: float = 0.5,
        blocklist: Iterable[str] = (),
        allowlist: Iterable[str] = (),
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self._classifier = classifier
        self._threshold = threshold
        self._blocked = _phrase_pattern(blocklist)
        self._allowed = _phrase_pattern(allowlist)
        self._waiting: list[tuple[str, asyncio.Future[bool]]] = []  # checks for the next classifier call
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SafetyFilter:
        """The filter `SAFETY`, `SAFETY_BLOCKLIST` and `SAFETY_ALLOWLIST` ask for (blocking: slow)."""
        if not settings.safety:
            log.info("Safety filter is off (SAFETY=off)")
            return cls(enabled=False)
        blocklist = read_phrases(settings.safety_blocklist)
        allowlist = read_phrases(settings.safety_allowlist)
        log.info(
            "Safety filter on: classifier alt-profanity-check, %d block-listed and %d allow-listed phrases",
            len(blocklist),
            len(allowlist),
        )
        return cls(classifier=load_classifier(), blocklist=blocklist, allowlist=allowlist)

    def is_unsafe(self, text: str) -> bool:
        """True if `text` must not pass (blocking; see `check` for the event loop)."""
        return self.are_unsafe([text])[0]

    def are_unsafe(self, texts: Sequence[str]) -> list[bool]:
        """`is_unsafe` for several texts with one classifier call (blocking)."""
        if not self.enabled:
            return [False] * len(texts)
        verdicts: list[bool] = []
        to_classify: dict[int, str] = {}  # index -> text the classifier sees
        for index, text in enumerate(texts):
            text = _normalize(text)
            blocked = self._blocked is not None and self._blocked.search(text) is not None
            verdicts.append(blocked)
            if blocked or self._classifier is None:
                continue
            if self._allowed is not None:
                text = self._allowed.sub(" ", text)
            if text.strip():
                to_classify[index] = text
        if to_classify:
            scores = self._classifier(list(to_classify.values()))
            for index, score in zip(to_classify, scores):
                verdicts[index] = float(score) >= self._threshold
        return verdicts

    async def check(self, text: str) -> bool:
        """`is_unsafe` off the event loop. The classifier costs ~3 ms a call, an
        ensemble of five calibrated models, however many texts the call holds, so
        checks that arrive together (a burst of messages, a batch of replies)
        share one call on a thread."""
        if not self.enabled:
            return False
        if self._classifier is None:
            return self.is_unsafe(text)  # a regex search: microseconds
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((text, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._classify_waiting())
        return await future

    async def _classify_waiting(self) -> None:
        await asyncio.sleep(0)  # checks started at the same moment join this call
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                verdicts = await asyncio.to_thread(self.are_unsafe, [text for text, _ in batch])
            except Exception as error:  # a broken classifier fails the checks, not the filter
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), verdict in zip(batch, verdicts):
                if not future.done():
                    future.set_result(verdict)


def load_classifier() -> Classifier:
    """alt-profanity-check's `predict_prob` (its import loads the model: slow)."""
    from profanity_check import predict_prob

    return predict_prob


def read_phrases(path: Path | None) -> list[str]:
    """Words or phrases, one a line; blank lines and lines starting with # are skipped."""
    if path is None:
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching any of `phrases` as whole words;
    the words of a phrase may be separated by any run of whitespace."""
    alternatives = sorted(
        {r"\s+".join(re.escape(word) for word in _normalize(phrase).split()) for phrase in phrases} - {""},
        key=len,
        reverse=True,  # longest first, so a phrase wins over a word it starts with
    )
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _normalize(text: str) -> str:
    """Fold look-alikes (full-width letters, ligatures) to plain ones and drop
    invisible format characters, so "ｂａｄ" and "b\u200dad" are checked as "bad"."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(char for char in text if unicodedata.category(char) != "Cf")
