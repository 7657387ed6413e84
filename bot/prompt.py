"""The one place that turns a conversation into encoder input ids.

BlenderBot checkpoints carry no chat template. We use the format of
transformers' own BlenderBot examples, whose published outputs show the real
checkpoints answering well with it: turns joined by the family's end and start
tokens (`</s> <s>` for BlenderBot, `__end__ __start__` for BlenderBot-small).
The separators are the model's own special tokens, so a turn boundary can never
be confused with text a user typed.

Long conversations are truncated from the left at token level: the oldest
tokens go first, the newest message always stays, and the input never exceeds
the model's position table (128 for BlenderBot, 512 for BlenderBot-small), which
would otherwise crash the model with "index out of range".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    separator: str  # between turns
    append_eos: bool  # the family's tokenizer ends the input with </s>


FAMILIES = {
    "blenderbot": Family("blenderbot", "</s> <s>", append_eos=True),
    "blenderbot-small": Family("blenderbot-small", "__end__ __start__", append_eos=False),
}


def format_turns(family: Family, turns: Sequence[str]) -> str:
    """Join the turns, oldest first, the newest user message last."""
    return family.separator.join(turn.strip() for turn in turns)


def encode_turns(tokenizer, family: Family, turns: Sequence[str], max_tokens: int) -> list[int]:
    """Input ids for one conversation, at most `max_tokens` long, truncated from the left."""
    ids = tokenizer(format_turns(family, turns), add_special_tokens=False)["input_ids"]
    suffix = [tokenizer.eos_token_id] if family.append_eos else []
    keep = max_tokens - len(suffix)
    if len(ids) > keep:
        ids = ids[len(ids) - keep :]
    return ids + suffix


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right padding with an attention mask: BlenderBot's positions are absolute,
    so left padding would shift every position and change the answer."""
    width = max(len(row) for row in rows)
    ids = [list(row) + [pad_id] * (width - len(row)) for row in rows]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
    return ids, mask
