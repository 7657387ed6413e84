"""`adapters.base.split_message`, the one place long replies are cut for Discord
and Slack: it runs on the event loop, so it must end on every input (issue 12,
item 6), keep every chunk within the limit and lose nothing but whitespace."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapters.base import split_message

# Pieces a reply can be made of: words, fences with and without a language,
# newlines, sentence ends, emoji sequences (ZWJ, skin tone, flags, variation
# selectors), combining marks (one, and a pile of them), right-to-left text.
PIECES = st.sampled_from([
    "word", "a", " ", "  ", "\n", "\n\n", ".", "! ", "```", "```python\n", "\n```\n", "`", "x" * 50,
    "👩\u200d💻", "👍🏽", "🏳️\u200d🌈", "🇫🇷", "\u2764\ufe0f", "e\u0301", "\u0301", "\u0301" * 40, "שלום", "مرحبا",
    "\t", "\u00a0",
])
TEXTS = st.lists(st.one_of(PIECES, st.text(max_size=20)), max_size=120).map("".join)


def non_space(text: str) -> str:
    return "".join(text.split())


def is_subsequence(needle: str, haystack: str) -> bool:
    remaining = iter(haystack)
    return all(char in remaining for char in needle)


@pytest.mark.timeout(300, method="thread")  # a split that never ends would hang here: fail the run loudly
@settings(max_examples=400, deadline=None)
@given(text=TEXTS, limit=st.integers(min_value=16, max_value=120))
@example(text="```" + "a" * 3000, limit=2000)  # looped forever before: a fence line longer than the limit
@example(text="```" + "a" * 300, limit=16)
@example(text="```python\n" + "print(1)\n" * 200, limit=40)
@example(text="a" + "\u0301" * 500, limit=16)
@example(text="👩\u200d💻" * 300, limit=17)
def test_every_text_is_split_within_the_limit_losing_only_whitespace(text: str, limit: int) -> None:
    chunks = split_message(text, limit)
    assert all(0 < len(chunk) <= limit for chunk in chunks), [len(chunk) for chunk in chunks]
    assert all(chunk.strip() for chunk in chunks)
    # Every non-space character, in order (closing and reopening fences only add some).
    assert is_subsequence(non_space(text), non_space("".join(chunks)))
    if len(text.strip()) <= limit:
        assert chunks == ([text.strip()] if text.strip() else [])


@pytest.mark.timeout(20)
def test_a_fence_line_longer_than_the_limit_ends_in_two_chunks() -> None:
    chunks = split_message("```" + "a" * 3000, 2000)
    assert [len(chunk) for chunk in chunks] == [2000, 1011]
    assert chunks[0].endswith("\n```") and chunks[1].startswith("```\n")
    assert "".join(chunks).count("a") == 3000


def test_code_blocks_are_closed_and_reopened_with_their_language() -> None:
    code = "```python\n" + "".join(f"print({i})\n" for i in range(40)) + "```"
    chunks = split_message("Here you go:\n\n" + code, 120)
    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.count("```") % 2 == 0, chunk  # every chunk renders as closed code
    assert all(chunk.startswith("```python\n") for chunk in chunks[2:])
