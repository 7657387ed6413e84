"""Running the bot for a community on Slack: the `/blenderbot` slash command through the real
slack_bolt app (HTTP mode, signed form posts as Slack sends them; answers through the
command's response_url) against the local fake (tests/fake_slack.py), with the memory in a
real SQLite file: who may change a channel's settings, the persona the model then gets,
channels that listen, and a DM's persona forgotten with "Forget my conversations"."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

import pytest
from fake_slack import (
    BOT_USER_ID,
    FakeSlack,
    block_actions,
    dm,
    event_body,
    home_opened,
    mention,
    new_ts,
    signed_headers,
    wait_for,
)
from test_slack import SECRET, Bot, answered, fake, start_bot  # noqa: F401 (fixtures)
from test_slack_surface import click, forget_button

from adapters.slack_commands import LISTEN_NOTE, NOT_AN_ADMIN
from adapters.slack_surface import FORGET_ACTION
from bot.memory import ChannelSettings

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def sqlite_memory(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/memory.db"


async def blenderbot(bot: Bot, fake: FakeSlack, text: str, *, user: str = "U2", channel: str = "C1") -> str:
    """Use `/blenderbot <text>` as Slack does (a signed form POST, acked at once) and wait for
    the answer posted to its response_url; that answer's text."""
    before = len(fake.responses)
    body = urlencode(fake.slash_command("/blenderbot", text, user=user, channel=channel))
    status, acked = await bot.send(body, headers=signed_headers(SECRET, body, content_type=FORM))
    assert status == 200 and acked == ""  # acked within Slack's 3 s, with nothing shown yet
    await wait_for(lambda: len(fake.responses) > before, what=f"the answer to /blenderbot {text}")
    [answer] = fake.responses[before:]
    assert answer["response_type"] == "ephemeral"  # only the person who used it sees it
    return answer["text"]


def channel_message(text: str, *, channel: str = "C1", user: str = "U2", **extra) -> dict:
    """A `message.channels` event (the fields of its reference page's example)."""
    return {"type": "message", "channel_type": "channel", "channel": channel, "user": user, "text": text,
            "ts": new_ts(), **extra}


async def test_an_admin_sets_a_persona_for_the_channel_and_a_member_is_refused(start_bot, fake, sqlite_memory):
    fake.admins.add("U2")
    bot = await start_bot(memory_url=sqlite_memory, slack_reply_in_thread=False)

    refused = await blenderbot(bot, fake, "persona I am a pirate", user="U3")
    assert refused == NOT_AN_ADMIN and "\n" not in refused  # one line
    assert await bot.engine.channel_settings("slack:T1:C1") == ChannelSettings()

    done = await blenderbot(bot, fake, "persona I love hiking | I have a dog")
    assert done.startswith("Done") and "I love hiking | I have a dog" in done
    await bot.send(event_body(mention("what do you do on weekends?")))
    await bot.send(event_body(mention("and here?", channel="C2")))
    await answered(fake, 2)
    assert sorted(bot.model.personas) == [(), ("I love hiking", "I have a dog")]  # C2 has none of its own

    shown = await blenderbot(bot, fake, "show", user="U3")  # showing is a change too: refused
    assert shown == NOT_AN_ADMIN
    shown = await blenderbot(bot, fake, "show")
    assert "Persona: its own: I love hiking | I have a dog" in shown and "Listening: off" in shown
    assert (await blenderbot(bot, fake, "reset")).startswith("Done")
    assert await bot.engine.channel_settings("slack:T1:C1") == ChannelSettings()


async def test_owners_and_slack_admin_users_may_and_unknown_verbs_get_the_usage(start_bot, fake, sqlite_memory):
    fake.owners.add("U3")
    fake.users["U4"] = "Carol"
    bot = await start_bot(memory_url=sqlite_memory, slack_admin_users=frozenset({"U4"}))
    # Slack escapes &, < and > in a command's text: the persona gets them back.
    assert (await blenderbot(bot, fake, "persona I am a robot &amp; I like R&amp;B", user="U3")).startswith("Done")
    assert (await blenderbot(bot, fake, "persona I am a cat", user="U4", channel="C2")).startswith("Done")
    assert (await bot.engine.channel_settings("slack:T1:C1")).persona == ("I am a robot & I like R&B",)
    assert (await bot.engine.channel_settings("slack:T1:C2")).persona == ("I am a cat",)
    assert "/blenderbot persona" in await blenderbot(bot, fake, "dance", user="U4")


async def test_an_unsafe_or_too_long_persona_is_refused_and_nothing_is_stored(start_bot, fake, sqlite_memory,
                                                                                 tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("zorblax\n", encoding="utf-8")
    fake.admins.add("U2")
    bot = await start_bot(memory_url=sqlite_memory, safety_blocklist=blocklist)
    assert "safety filter" in await blenderbot(bot, fake, "persona I love hiking | I am a zorblax")
    assert "may be at most" in await blenderbot(bot, fake, "persona " + "|".join(["i like to read books."] * 25))
    assert "Write the persona" in await blenderbot(bot, fake, "persona")
    assert await bot.engine.channel_settings("slack:T1:C1") == ChannelSettings()


async def test_a_listening_channel_answers_every_message_and_a_normal_one_does_not(start_bot, fake, sqlite_memory):
    fake.admins.add("U2")
    bot = await start_bot(memory_url=sqlite_memory, echo=True)
    await bot.send(event_body(channel_message("anyone up for a hike?")))
    await asyncio.sleep(0.3)
    assert fake.posts == []  # not listening yet

    done = await blenderbot(bot, fake, "listen on")
    assert done.startswith("Done: I answer every message") and LISTEN_NOTE in done
    message = channel_message("anyone up for a hike?")
    assert (await bot.send(event_body(message)))[0] == 200
    [post] = await answered(fake, 1)
    assert (post.params["channel"], post.params["thread_ts"], post.params["text"]) == (
        "C1", message["ts"], "re: anyone up for a hike?")  # in a thread of its own, as a mention's answer

    # Said to someone else or everyone, by a bot, a mention (its app_mention event answers it), or in
    # a channel that does not listen: none answered from these message events.
    for event in (channel_message("<@U3> are you coming?"), channel_message("<!here> lunch?"),
                  {k: v for k, v in channel_message("beep", bot_id="B9", subtype="bot_message").items()
                   if k != "user"},  # a bot's post has no `user` (Slack's MessageBotPayload sample)
                  channel_message(f"<@{BOT_USER_ID}> hello"), channel_message("hello?", channel="C2")):
        assert (await bot.send(event_body(event)))[0] == 200
    await bot.send(event_body(channel_message("and this one")))
    await answered(fake, 2)
    await asyncio.sleep(0.3)
    assert [p.params["text"] for p in fake.posts] == ["re: anyone up for a hike?", "re: and this one"]
    assert all(p.params.get("metadata") for p in fake.posts)  # recorded and answered like any message

    assert (await blenderbot(bot, fake, "listen off")).startswith("Done")
    await bot.send(event_body(channel_message("still there?")))
    await asyncio.sleep(0.3)
    assert len(fake.posts) == 2


async def test_forgetting_the_dm_on_the_home_tab_forgets_the_persona_given_there(start_bot, fake, sqlite_memory):
    bot = await start_bot(memory_url=sqlite_memory)
    # In their DM with the bot anyone may give it a persona: it is their own conversation.
    assert (await blenderbot(bot, fake, "persona I am a pirate", channel="D1")).startswith("Done")
    assert await blenderbot(bot, fake, "listen on", channel="D1") == "In our DM I answer every message already."
    await bot.send(event_body(dm("ahoy!")))
    await answered(fake, 1)
    assert bot.model.personas == [("I am a pirate",)]

    assert (await bot.send(event_body(home_opened("home"))))[0] == 200
    view = await wait_for(lambda: fake.home_views.get("U2"), what="the Home tab")
    assert "/blenderbot persona" in json.dumps(view) and "/blenderbot listen on" in json.dumps(view)
    assert "In our DM my persona is: I am a pirate" in json.dumps(view)
    assert await click(bot, block_actions({"type": "button", "action_id": FORGET_ACTION, "block_id": "b",
                                           "value": forget_button(view)["value"]}, view=view)) == 200
    await wait_for(lambda: "Done" in json.dumps(fake.home_views["U2"]), what="the confirmation on the Home tab")
    assert await bot.engine.channel_settings("slack:T1:D1") == ChannelSettings()
    assert await bot.engine.history("slack:T1:D1") == []
    assert "my persona is" not in json.dumps(fake.home_views["U2"])


async def test_in_socket_mode_the_command_is_acked_on_the_socket_and_answered(start_bot, fake, sqlite_memory):
    fake.admins.add("U2")
    bot = await start_bot(socket_mode=True, memory_url=sqlite_memory)
    envelope = await fake.send_slash_command(fake.slash_command("/blenderbot", "listen on", channel="G1"))
    await wait_for(lambda: fake.acked(envelope), what="the ack")
    await wait_for(lambda: fake.responses, what="the answer")
    assert fake.responses[0]["text"].startswith("Done: I answer every message")
    assert await bot.engine.listening("slack:T1:G1")
    # A private channel's messages come as message.groups events.
    await fake.send_envelope(event_body(channel_message("hello, private channel", channel="G1", channel_type="group")))
    [post] = await answered(fake, 1)
    assert post.params["channel"] == "G1"


async def test_reset_in_a_dm_forgets_its_persona_but_reset_in_a_channel_keeps_the_channels(start_bot, fake,
                                                                                          sqlite_memory):
    fake.admins.add("U2")
    bot = await start_bot(memory_url=sqlite_memory)
    await blenderbot(bot, fake, "persona I am a pirate", channel="D1")
    await blenderbot(bot, fake, "persona I love hiking")
    await bot.send(event_body(dm("reset")))
    await bot.send(event_body(mention("reset")))
    await answered(fake, 2)
    assert await bot.engine.channel_settings("slack:T1:D1") == ChannelSettings()
    assert (await bot.engine.channel_settings("slack:T1:C1")).persona == ("I love hiking",)
