"""Slack's message markup, both ways: what the model reads and what Slack shows.

Incoming text carries live tokens (`<@U123>`, `<!channel>`, `<!subteam^S1>`,
links) and escapes `&`, `<`, `>`. The model gets plain words; what we send is
escaped so that nothing in an answer pings anyone or renders as markup.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_TOKEN = re.compile(r"<([^<>\n]*)>")
_USER_ID = re.compile(r"<@([A-Z0-9]+)(?:\|[^<>]*)?>")
# Plain-text broadcasts that a client or a future `link_names` could still turn into pings.
_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
WORD_JOINER = "\u2060"


def mentioned_users(text: str) -> set[str]:
    """The user ids mentioned with `<@U…>` in raw Slack text."""
    return set(_USER_ID.findall(text))


def to_model_text(text: str, *, bot_user_id: str | None, names: Mapping[str, str]) -> str:
    """Raw Slack text as the model should read it: the bot's own mention removed,
    other users by name, broadcasts and group pings as plain words, links as their label."""

    def plain(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            user = target[1:]
            if user == bot_user_id:
                return ""
            return names.get(user) or label or "someone"
        if target.startswith("#"):
            return "#" + (label or "a channel")
        if target.startswith("!"):
            keyword = target[1:].split("^", 1)[0]
            if keyword in ("channel", "here", "everyone"):
                return "@" + keyword
            if keyword == "subteam":
                return label or "@a group"
            return label  # dates and other specials: their fallback text
        return label or target  # links: the label, else the address

    text = _TOKEN.sub(plain, text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"[ \t]+", " ", text).strip()


def to_slack_text(text: str) -> str:
    """Text for chat.postMessage that Slack shows literally: no links, pings or markup tokens."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCAST.sub(lambda m: "@" + WORD_JOINER + m.group(1), text)
