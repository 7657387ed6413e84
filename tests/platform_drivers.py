"""One way to talk to the bot on every platform, for tests that must hold on all of them.

Each driver runs the real adapter (or the web API) over a real engine and a
`Scripted` model, and hides how a platform is addressed: `say()` sends a
message from "first" or "second" user, `replies()` / `reply()` read what the
bot sent back to it, `settle()` waits until everything sent before has been
handled, and `assert_nothing_pings()` checks everything the bot sent.
Platforms: Discord (tests/fake_discord.py), Slack in HTTP or Socket Mode
(tests/fake_slack.py), and the web JSON API over real HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp.test_utils import TestClient
from fake_discord import BOT_ID, DM_CHANNEL_ID, OTHER_CHANNEL_ID, OTHER_USER_ID, USER_ID, FakeDiscord
from fake_slack import FakeSlack, dm, event_body, json_blocks, mention, new_ts, wait_for
from model_doubles import GatedModel
from test_discord import MENTION, answer_to
from test_slack import Bot as SlackBot

from adapters.discord import DiscordAdapter
from adapters.slack_text import WORD_JOINER
from bot.chat_model import Generated
from bot.engine import ReplyEngine

# A mention that would still ping as plain text or markup: "@" right before a
# broadcast name, or an angle-bracket token of either platform.
LIVE_MENTION = re.compile(r"<[@!]|@(?:everyone|here|channel)\b", re.IGNORECASE)
# In Slack text: a live token (<@U1>, <!channel>, <!subteam^S1>...), a raw < or >,
# an & that is no entity, or a broadcast word that link_names could still turn into a ping.
SLACK_LIVE = re.compile(r"[<>]|&(?!amp;|lt;|gt;)|@(?:everyone|here|channel)\b", re.IGNORECASE)

SETTLE_TEXT = "are you still there?"  # what settle() says
Rewrite = Callable[[str, list[str], bool], str]


def parrot(text: str, turns: list[str], sample: bool) -> str:
    """The model's own words, then the user's message back: a reply that would ping
    if a hostile message's mentions got through."""
    return f"{text} (you said: {turns[-1]})"


class Scripted(GatedModel):
    """The real tiny model, recording what it was asked; `rewrite` turns its text
    into the reply (by default `parrot`)."""

    def __init__(self, model: Any, rewrite: Rewrite = parrot) -> None:
        super().__init__(model)
        self.rewrite = rewrite

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        results = super().generate(conversations, sample=sample, personas=personas)
        return [
            Generated(self.rewrite(result.text, list(turns), sample), result.new_tokens)
            for result, turns in zip(results, conversations)
        ]

    def asked(self) -> list[list[str]]:
        """The turns of every conversation the model was asked to answer, in order."""
        return [turns for batch in self.batches for turns in batch]


class DiscordDriver:
    users = {"first": USER_ID, "second": OTHER_USER_ID}

    def __init__(self, fake: FakeDiscord, adapter: DiscordAdapter, engine: ReplyEngine, model: Scripted) -> None:
        self.fake, self.adapter, self.engine, self.model = fake, adapter, engine, model

    def conversation(self, message_id: int) -> str:
        """The conversation a message belongs to."""
        return f"discord:{self.fake.messages[message_id]['channel_id']}"

    async def say(self, text: str, *, user: str = "first", where: str = "channel") -> int:
        """`where`: "channel" (mentioning the bot), "dm", or "unaddressed" (a channel message without a mention)."""
        author = self.users[user]
        if where == "dm":
            return await self.fake.send_message(text, channel_id=DM_CHANNEL_ID, author_id=author)
        if where == "unaddressed":
            return await self.fake.send_message(text, author_id=author, mention_everyone="@everyone" in text)
        content = f"{MENTION} {text}" if text else MENTION
        return await self.fake.send_message(content, author_id=author, mentions=(BOT_ID,))

    def replies(self, message_id: int) -> list[str]:
        return [
            call.json["content"]
            for call in self.fake.created()
            if int((call.json.get("message_reference") or {}).get("message_id", 0)) == message_id
        ]

    async def reply(self, message_id: int) -> str:
        return (await self.fake.wait_for(lambda: self.replies(message_id), what=f"a reply to {message_id}"))[0]

    async def settle(self, user: str = "second") -> None:
        """Gateway events are handled in order: once a later mention is answered, earlier ones were seen."""
        await answer_to(self.fake, f"{MENTION} {SETTLE_TEXT}", channel_id=OTHER_CHANNEL_ID,
                        author_id=self.users[user], mentions=(BOT_ID,))

    def readable(self, sent: str) -> str:
        return sent

    def assert_nothing_pings(self) -> None:
        sent = [call for call in self.fake.calls if call.method == "POST" and call.json]
        for call in sent:
            data = call.json.get("data", call.json)  # interaction callbacks nest the message
            if "content" not in data:
                continue
            assert data["allowed_mentions"]["parse"] == [], call
            assert not data["allowed_mentions"].get("replied_user"), call
            assert not LIVE_MENTION.search(data["content"]), data["content"]


class SlackDriver:
    users = {"first": "U2", "second": "U3"}

    def __init__(self, fake: FakeSlack, bot: SlackBot, *, socket_mode: bool) -> None:
        self.fake, self.bot, self.socket_mode = fake, bot, socket_mode
        self.adapter, self.engine, self.model = bot.adapter, bot.engine, bot.model

    def conversation(self, sent: tuple[str, str | None, str, int]) -> str:
        """The conversation a message belongs to (a thread, or a whole DM)."""
        channel, thread, _, _ = sent
        return f"slack:T1:{channel}" if thread is None or channel.startswith("D") else f"slack:T1:{channel}:{thread}"

    async def say(self, text: str, *, user: str = "first", where: str = "channel",
                  thread: str | None = None, channel: str | None = None) -> tuple[str, str | None, str, int]:
        """Returns where the answer goes (channel, thread), the message's ts, and how many posts came before."""
        author = self.users[user]
        if where == "dm":
            event = dm(text, channel=channel or "D1", user=author)
        elif where == "unaddressed":
            event = {"type": "message", "channel_type": "channel", "user": author, "text": text, "ts": new_ts(),
                     "channel": channel or "C1"}
        else:
            event = mention(text, channel=channel or "C1", user=author, thread_ts=thread)
        before = len(self.fake.posts)
        body = event_body(event)
        if self.socket_mode:
            envelope = await self.fake.send_envelope(body)
            await wait_for(lambda: self.fake.acked(envelope), what="the ack")
        else:
            status, _ = await self.bot.send(body)
            assert status == 200
        reply_thread = thread or event["ts"]  # a DM's answer too: in the thread of the user's message
        return event["channel"], reply_thread, event["ts"], before

    def replies(self, sent: tuple[str, str | None, str, int]) -> list[str]:
        channel, thread, _, before = sent
        return [p.params["text"] for p in self.fake.posts[before:]
                if p.params["channel"] == channel and p.params.get("thread_ts") == thread]

    async def reply(self, sent: tuple[str, str | None, str, int]) -> str:
        """The first reply to `sent`, once every sign of thinking (status, hourglass) is gone again."""
        replies = await wait_for(lambda: self.replies(sent), what="a reply")
        await wait_for(lambda: not self.fake.thinking, what="the thinking status or hourglass cleared")
        return replies[0]

    async def settle(self, user: str = "second") -> None:
        """Events are handled as they are acked: once a later DM is answered, earlier ones were seen."""
        assert await self.reply(await self.say(SETTLE_TEXT, user=user, where="dm", channel="DSETTLE"))

    def readable(self, sent: str) -> str:
        """What a Slack user reads: entities decoded, the word joiner invisible."""
        return sent.replace(WORD_JOINER, "").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")

    def assert_nothing_pings(self) -> None:
        for post in self.fake.posts:
            assert post.params.get("link_names") in (None, False, "false", "0", 0), post.params
            assert not SLACK_LIVE.search(post.params["text"]), post.params["text"]
            for block in json_blocks(post):  # the section that carries a reply with its feedback buttons
                if block["type"] == "section":
                    assert not SLACK_LIVE.search(block["text"]["text"]), block


class WebDriver:
    users = {"first": "alice", "second": "bob"}

    def __init__(self, client: TestClient, engine: ReplyEngine, model: Scripted) -> None:
        self.client, self.engine, self.model = client, engine, model
        self.answers: list[tuple[int, dict[str, Any], str | None]] = []  # status, body, Retry-After

    def conversation(self, sent: int) -> str:
        return "web:abuse"

    async def say(self, text: str, *, user: str = "first", where: str = "channel") -> int:
        body = {"conversation": "abuse", "text": text, "user": self.users[user]}
        response = await self.client.post("/api/chat", json=body)
        self.answers.append((response.status, await response.json(), response.headers.get("Retry-After")))
        return len(self.answers) - 1

    def status(self, sent: int) -> int:
        return self.answers[sent][0]

    def replies(self, sent: int) -> list[str]:
        body = self.answers[sent][1]
        return [body["reply"] if "reply" in body else body["error"]]

    async def reply(self, sent: int) -> str:
        return self.replies(sent)[0]

    async def settle(self, user: str = "second") -> None:
        """Every answer came with its request."""

    def readable(self, sent: str) -> str:
        return sent

    async def forget(self) -> dict[str, Any]:
        response = await self.client.post("/api/reset", json={"conversation": "abuse"})
        assert response.status == 200
        return await response.json()

    def assert_nothing_pings(self) -> None:
        for _, body, _ in self.answers:
            assert not LIVE_MENTION.search(body.get("reply") or body.get("error") or ""), body
