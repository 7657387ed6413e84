"""Cleaning user text before the model sees it, and defusing mentions in what the bot sends."""

from __future__ import annotations

import re
import unicodedata

# Zero-width and invisible formatting characters that carry no meaning for the
# model, and the bidirectional overrides that can disguise text. Right-to-left
# scripts need none of them to display.
_INVISIBLE = re.compile("[\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00ad]")
# Zero-width (non-)joiners build emoji sequences (👩‍💻) and shape Persian and
# Indic words, so they stay between two non-ASCII characters; next to ASCII
# they only split words ("ba\u200dd").
_STRAY_JOINER = re.compile("(?<![^\x00-\x7f])[\u200c\u200d]|[\u200c\u200d](?![^\x00-\x7f])")

ZWSP = "\u200b"  # after "@" it keeps the text readable and stops the ping

# Slack: <!channel>, <!here>, <!everyone>, optionally with a |label.
_SLACK_BROADCAST = re.compile(r"<!(channel|here|everyone)(?:\|[^>]*)?>", re.IGNORECASE)
# Slack user groups: <!subteam^S123> or <!subteam^S123|@team>.
_SLACK_SUBTEAM = re.compile(r"<!subteam\^([A-Za-z0-9]+)(?:\|@?([^>]*))?>", re.IGNORECASE)
# Discord <@123>, <@!123>, <@&123> (role); Slack <@U123>, <@U123|name>.
_ANGLE_MENTION = re.compile(r"<@([!&]?)([A-Za-z0-9]+)(?:\|([^>]*))?>")
# What is left of any other <!...> Slack command, e.g. a future broadcast.
_SLACK_COMMAND = re.compile(r"<!([^>]*)>")
# Plain-text broadcasts: Discord pings @everyone and @here as typed.
_BARE_BROADCAST = re.compile(r"@(?=(everyone|here|channel)\b)", re.IGNORECASE)


def clean_text(text: str) -> str:
    """Drop control and zero-width characters, keep newlines, trim the ends."""
    text = _STRAY_JOINER.sub("", _INVISIBLE.sub("", text))
    text = "".join(
        char for char in text if char in "\n\t" or unicodedata.category(char) not in ("Cc", "Cs", "Co", "Cn")
    )
    return text.strip()


def neutralize_mentions(text: str) -> str:
    """`text` with every mention token of Discord and Slack made inert: Slack's
    `<!channel>` becomes `@\u200bchannel`, `<@123>` becomes `@\u200b123`, `@everyone`
    becomes `@\u200beveryone`. Safe to apply twice."""
    text = _SLACK_BROADCAST.sub(lambda m: "@" + ZWSP + m.group(1).lower(), text)
    text = _SLACK_SUBTEAM.sub(lambda m: "@" + ZWSP + (m.group(2) or "team"), text)
    text = _ANGLE_MENTION.sub(lambda m: "@" + ZWSP + (m.group(3) or m.group(1).replace("!", "") + m.group(2)), text)
    text = _SLACK_COMMAND.sub(lambda m: "!" + m.group(1), text)
    return _BARE_BROADCAST.sub("@" + ZWSP, text)
