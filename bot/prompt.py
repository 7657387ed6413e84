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

A persona (a few facts the bot says about itself) goes first, in the format the
checkpoints were fine-tuned on. BlenderBot 90M/400M/1B/3B were fine-tuned on
Blended Skill Talk (BST), whose every first context opens with the guided
speaker's persona, one line each, `your persona: <fact>`, joined by newlines,
with a newline before the conversation (ParlAI, `parlai/tasks/blended_skill_talk/
build.py`, `_get_line`: `'\\n'.join(persona_pieces + ... + utterances)`; its test
fixture `blended_skill_talk_train.yml` shows `your persona: i've 2 kids.\\nyour
persona: i love flowers.\\n...`). ParlAI's authors describe it the same way: "The
persona is provided as a line in the dialogue context prefaced with 'your
persona:'" and "we use newlines between persona lines" (ParlAI issues #2820 and
#3949). Here the persona block, `your persona: a\\nyour persona: b\\n`, is
tokenized on its own and put before the turns. Both families take it: BlenderBot's
byte-level BPE keeps the newline as a token (`Ċ`); BlenderBot-small's tokenizer
lower-cases it and writes each newline as its `__newln__` token, as its ParlAI
dictionary did. The persona always stays whole and first: the history behind it is
what truncation cuts, and a persona that would leave less than half the window to
the conversation is refused when it is set (`check_persona`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

# A fast tokenizer keeps `split_special_tokens` as state of its Rust backend, set by each call:
# two threads tokenizing at once (the runtime's two workers, a persona check on the event loop)
# could encode one call with the other's setting. So one call at a time.
_TOKENIZING = threading.Lock()


@dataclass(frozen=True)
class Family:
    model_type: str
    separator: str  # between turns
    append_eos: bool  # the family's tokenizer ends the input with </s>
    newline_token: str | None = None  # the vocabulary's token for a newline, where it has one


FAMILIES = {
    "blenderbot": Family("blenderbot", "</s> <s>", append_eos=True),
    "blenderbot-small": Family("blenderbot-small", "__end__ __start__", append_eos=False, newline_token="__newln__"),
}


PERSONA_PREFIX = "your persona: "


class PersonaTooLong(ValueError):
    """A persona that would leave too little of the window for the conversation."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"That persona is {tokens} tokens long; with this model it may be at most {limit} "
            f"(roughly {limit * 4} characters of English), so that the conversation keeps half of the model's window."
        )
        self.tokens = tokens
        self.limit = limit


def persona_lines(text: str) -> tuple[str, ...]:
    """The facts of a persona written as one text: lines separated by `|` or newlines."""
    return tuple(line.strip() for line in text.replace("\n", "|").split("|") if line.strip())


def encode_persona(tokenizer, family: Family, persona: Sequence[str]) -> list[int]:
    """The ids of the BST persona block (`your persona: <fact>` lines, each ending in a newline)."""
    lines = [f"{PERSONA_PREFIX}{line.strip()}" for line in persona if line.strip()]
    if not lines:
        return []
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    if family.newline_token is None:  # byte-level BPE: the newline is text like any other
        encoded = [_tokenize(tokenizer, "".join(line + "\n" for line in lines), split_special_tokens=True)]
    else:  # the newline token itself, whatever merges the vocabulary has
        newline = tokenizer.convert_tokens_to_ids(family.newline_token)
        encoded = [ids + [newline] for ids in _tokenize(tokenizer, lines, split_special_tokens=True)]
    return [token for ids in encoded for token in ids if token not in special]


def persona_limit(family: Family, max_tokens: int) -> int:
    """The most tokens a persona may take: half the window, the rest is the conversation's."""
    return (max_tokens - int(family.append_eos)) // 2


def check_persona(tokenizer, family: Family, persona: Sequence[str], max_tokens: int) -> None:
    """Raise `PersonaTooLong` for a persona that would not leave the conversation half the window."""
    tokens = len(encode_persona(tokenizer, family, persona))
    limit = persona_limit(family, max_tokens)
    if tokens > limit:
        raise PersonaTooLong(tokens, limit)


def encode_turns(
    tokenizer, family: Family, turns: Sequence[str], max_tokens: int, persona: Sequence[str] = ()
) -> list[int]:
    """Input ids for one conversation (turns oldest first, the newest user message
    last), at most `max_tokens` long, truncated from the left. A `persona` (its
    facts) comes first and whole: the turns behind it are what is cut."""
    head = encode_persona(tokenizer, family, persona)
    if len(head) > persona_limit(family, max_tokens):  # checked when set; never crowd out the message
        head = []
    separator = separator_ids(tokenizer, family)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    texts = [turn.strip() for turn in turns]
    encoded = _tokenize(tokenizer, texts, split_special_tokens=True) if texts else []
    ids: list[int] = []
    for index, turn_ids in enumerate(encoded):
        if index:
            ids += separator
        ids += [token for token in turn_ids if token not in special]
    suffix = [tokenizer.eos_token_id] if family.append_eos else []
    keep = max_tokens - len(suffix) - len(head)
    if len(ids) > keep:
        ids = ids[len(ids) - keep :]
    return head + ids + suffix


def separator_ids(tokenizer, family: Family) -> list[int]:
    """The ids between two turns: the family's separator, its special tokens as such."""
    return _tokenize(tokenizer, family.separator, split_special_tokens=False)


def _tokenize(tokenizer, texts: str | list[str], *, split_special_tokens: bool):
    """`tokenizer(texts)["input_ids"]` without special tokens added, one thread at a time (see `_TOKENIZING`)."""
    with _TOKENIZING:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right padding with an attention mask: BlenderBot's positions are absolute,
    so left padding would shift every position and change the answer."""
    width = max(len(row) for row in rows)
    ids = [list(row) + [pad_id] * (width - len(row)) for row in rows]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
    return ids, mask
