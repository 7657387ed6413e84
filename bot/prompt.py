"""The one place that turns a conversation into encoder input ids.

BlenderBot checkpoints carry no chat template. We use the format of
transformers' own BlenderBot examples, whose published outputs show the real
checkpoints answering well with it: turns joined by the family's end and start
tokens (`</s> <s>` for BlenderBot, `__end__ __start__` for BlenderBot-small).

Only the separators are special tokens. Each turn is tokenized on its own with
`split_special_tokens=True`, so a user who types `</s> <s>` (or `__end__
__start__`) gets those characters as ordinary text, never a turn boundary: one
person in a shared channel cannot plant fake bot turns that every later prompt
would see. Should a tokenizer still produce a special token from typed text (a
BPE merge that rebuilds `__end__`), it is dropped from the turn. For ordinary
text the ids are exactly those of tokenizing the joined string.

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


def encode_turns(tokenizer, family: Family, turns: Sequence[str], max_tokens: int) -> list[int]:
    """Input ids for one conversation (turns oldest first, the newest user message
    last), at most `max_tokens` long, truncated from the left."""
    separator = separator_ids(tokenizer, family)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    texts = [turn.strip() for turn in turns]
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    ids: list[int] = []
    for index, turn_ids in enumerate(encoded):
        if index:
            ids += separator
        ids += [token for token in turn_ids if token not in special]
    suffix = [tokenizer.eos_token_id] if family.append_eos else []
    keep = max_tokens - len(suffix)
    if len(ids) > keep:
        ids = ids[len(ids) - keep :]
    return ids + suffix


def separator_ids(tokenizer, family: Family) -> list[int]:
    """The ids between two turns: the family's separator, its special tokens as such."""
    return tokenizer(family.separator, add_special_tokens=False, split_special_tokens=False)["input_ids"]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right padding with an attention mask: BlenderBot's positions are absolute,
    so left padding would shift every position and change the answer."""
    width = max(len(row) for row in rows)
    ids = [list(row) + [pad_id] * (width - len(row)) for row in rows]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
    return ids, mask
