"""Cleaning user text before the model sees it."""

from __future__ import annotations

import re
import unicodedata

# Zero-width and invisible formatting characters that carry no meaning for the model.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00ad]")


def clean_text(text: str) -> str:
    """Drop control and zero-width characters, keep newlines, trim the ends."""
    text = _INVISIBLE.sub("", text)
    text = "".join(
        char for char in text if char in "\n\t" or unicodedata.category(char) not in ("Cc", "Cs", "Co", "Cn")
    )
    return text.strip()
