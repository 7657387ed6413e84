"""Keeping secrets out of the logs.

`SecretRedactor` is a logging filter for handlers: it replaces the values of
the secret settings, and anything shaped like a Discord or Slack token, a
bearer token or a password in a URL, with `<redacted>` in the message, its
arguments and any traceback, before a handler writes the record.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from bot.config import SECRET_VARIABLES, Settings

REDACTED = "<redacted>"

# Secret values shorter than this are left alone: replacing every "ab" in the
# logs would hide nothing worth hiding and make the logs unreadable.
MIN_SECRET_CHARS = 4

_TOKEN_SHAPES = [
    re.compile(r"\bxox[abeoprs]-[A-Za-z0-9-]+"),  # Slack bot, user and legacy tokens
    re.compile(r"\bxapp-[A-Za-z0-9-]+"),  # Slack app-level tokens
    re.compile(r"\b[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,}"),  # Discord bot tokens
]
_AUTH_HEADER = re.compile(r"\b(Bot|Bearer)\s+[A-Za-z0-9._~+/=-]{16,}")
_URL_PASSWORD = re.compile(r"(\w+://[^/\s:@]*:)[^/\s@]+@")


def secret_values(settings: Settings) -> list[str]:
    """The values of the settings in `SECRET_VARIABLES` that are set."""
    values = (getattr(settings, name.lower(), None) for name in SECRET_VARIABLES)
    return [value for value in values if isinstance(value, str) and value]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with `secrets` and token-shaped strings replaced by `<redacted>`."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    for shape in _TOKEN_SHAPES:
        text = shape.sub(REDACTED, text)
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


class SecretRedactor(logging.Filter):
    """Attach to handlers (a filter on a logger misses its children's records)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = [secret for secret in secrets if secret]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self._secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True
