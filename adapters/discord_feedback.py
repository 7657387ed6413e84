"""Reactions on the bot's replies on Discord: 👍 / 👎 rate the exchange, 🔁 asks for
another answer ("try again", edited into the reply; adapters/discord.py).

A reply this process sent is remembered by message id (bounded). Any other reply
of the bot (sent before a restart, or by another replica) is known by the message
it answers: the user's message its first chunk replies to (whose key names the
exchange, see bot/inbox), or the interaction it is the answer to. Never by its
text alone: the bot often says the same thing twice, and a rating of one reply
must not land on another.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from adapters.base import split_message
from bot.engine import shown_text
from bot.memory import BAD, GOOD, Exchange, ExchangeRef

MAX_REMEMBERED = 20_000  # message ids of recent replies, each a few hundred bytes
_SKIN_TONES = "".join(chr(code) for code in range(0x1F3FB, 0x1F400))
_RATINGS = {"\N{THUMBS UP SIGN}": GOOD, "\N{THUMBS DOWN SIGN}": BAD}
AGAIN = "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}"  # 🔁


def rating_for(emoji: str) -> str | None:
    """GOOD for 👍, BAD for 👎 (in any skin tone); None for any other reaction."""
    return _RATINGS.get(emoji.rstrip("\ufe0f").rstrip(_SKIN_TONES))


def is_again(emoji: str) -> bool:
    """True for 🔁 (with or without its emoji presentation selector)."""
    return emoji.rstrip("\ufe0f") == AGAIN


class RepliesSent:
    """Which exchange (by its id) each recent reply message is (its chunks all name the same one)."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._exchanges: OrderedDict[int, ExchangeRef] = OrderedDict()

    def remember(self, message_ids: Iterable[int], exchange: ExchangeRef) -> None:
        for message_id in message_ids:
            self._exchanges[message_id] = exchange
            self._exchanges.move_to_end(message_id)
        while len(self._exchanges) > self._limit:
            self._exchanges.popitem(last=False)

    def get(self, message_id: int) -> ExchangeRef | None:
        return self._exchanges.get(message_id)

    def __len__(self) -> int:
        return len(self._exchanges)


def exchange_answering(
    history: list[Exchange], exchange_id: str, content: str, conversation: str, limit: int
) -> ExchangeRef | None:
    """The stored exchange `exchange_id` if a reply with `content` is one of its chunks (as
    the reply was sent in chunks of `limit`); None if it is not remembered (forgotten, or
    the reply was a notice, which is no exchange) or the content is not its reply's."""
    for exchange in history:
        if exchange.id == exchange_id and content in split_message(shown_text(exchange.bot), limit):
            return ExchangeRef(conversation, exchange.id)
    return None
