"""Running the bot for a community on Discord: `/blenderbot persona|listen|show|reset` through the
real discord.py client against the local fake (tests/fake_discord.py), with the memory in a real
SQLite file: who may change a channel's settings, the persona the model then gets, channels
that listen, and a DM's settings forgotten with the DM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from fake_discord import (
    BOT_ID,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    EPHEMERAL,
    MANAGE_CHANNELS,
    MEMBER_PERMISSIONS,
    OTHER_BOT_ID,
    OTHER_CHANNEL_ID,
    OTHER_USER_ID,
    THREAD_ID,
    FakeDiscord,
)
from model_doubles import GatedModel
from test_discord import MENTION, RunningBot, answer_to, fake, settle  # noqa: F401 (fixtures)

from adapters.discord import HELP_TEXT, RESET_DONE, DiscordAdapter
from adapters.discord_settings import LISTEN_NEEDS_INTENT, NOT_A_MODERATOR
from bot.engine import ReplyEngine
from bot.memory import ChannelSettings, open_store

MODERATOR = MEMBER_PERMISSIONS | MANAGE_CHANNELS
PERSONA = ("I love hiking", "I have a dog")
BLOCKLIST = "zorblax\n"


@pytest.fixture
async def start_bot(fake, tiny_model, make_settings, tmp_path) -> AsyncIterator[Callable[..., Awaitable[RunningBot]]]:
    """A bot over the tiny model and a real SQLite memory, against `fake`; stopped after the test."""
    running: list[tuple[DiscordAdapter, ReplyEngine]] = []
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text(BLOCKLIST, encoding="utf-8")

    async def start(**overrides) -> RunningBot:
        settings = make_settings(
            discord_token=fake.token, discord_api_url=fake.api_url, discord_gateway_url=fake.gateway_url,
            memory_url=f"sqlite:///{tmp_path}/memory.db", safety_blocklist=blocklist, **overrides,
        )
        model = GatedModel(tiny_model)
        engine = ReplyEngine(model, open_store(settings.memory_url, max_turns=settings.memory_max_turns), settings)
        await engine.start()
        adapter = DiscordAdapter(settings, engine)
        running.append((adapter, engine))
        await adapter.start()
        return RunningBot(adapter, engine, model)

    yield start
    for adapter, engine in reversed(running):
        adapter.stop_accepting()
        await adapter.drain(10)
        await adapter.close()
        await engine.close()


async def blenderbot(fake: FakeDiscord, verb: str, *, permissions: int = MODERATOR, channel_id: int = CHANNEL_ID,
                     **options) -> dict:
    """Use `/blenderbot <verb>` and wait for its answer: the JSON of the last call it made
    (the callback's `data` for an answer at once, or the followup after "thinking...")."""
    interaction = await fake.slash_command("blenderbot", subcommand=verb, options=options, permissions=permissions,
                                           channel_id=channel_id)

    def answered() -> list | None:
        calls = fake.interaction_calls(interaction)
        if calls and calls[0].json["type"] == 4:
            return calls
        return calls if len(calls) >= 2 else None

    calls = await fake.wait_for(answered, what=f"/blenderbot {verb}")
    if calls[0].json["type"] == 4:  # answered at once
        return calls[0].json["data"]
    assert calls[0].json["type"] == 5 and calls[0].json["data"]["flags"] & EPHEMERAL  # only the asker sees it
    return calls[1].json


def personas(bot: RunningBot) -> list[tuple[str, ...]]:
    """The persona of every conversation the model was asked to answer, in order."""
    return [persona for batch in bot.model.personas for persona in batch]


async def test_the_settings_command_is_for_moderators_where_the_bot_is(fake, start_bot):
    await start_bot()
    [command] = [c for c in fake.commands if c["name"] == "blenderbot"]
    assert int(command["default_member_permissions"]) == MANAGE_CHANNELS  # Discord shows it to moderators only
    assert command["integration_types"] == [0]  # a server install: not through someone's user install
    assert sorted(command["contexts"]) == [0, 1]  # servers and the bot's own DM
    verbs = {option["name"]: option for option in command["options"]}
    assert set(verbs) == {"persona", "listen", "show", "reset"} and all(v["type"] == 1 for v in verbs.values())
    [mode] = verbs["listen"]["options"]
    assert [choice["value"] for choice in mode["choices"]] == ["on", "off"]
    assert "/blenderbot persona" in HELP_TEXT and "/blenderbot listen" in HELP_TEXT


async def test_a_moderator_sets_a_persona_that_the_channel_and_its_threads_get(fake, start_bot):
    bot = await start_bot()
    answer = await blenderbot(fake, "persona", text="I love hiking | I have a dog")
    assert answer["content"].startswith("Done") and "I love hiking | I have a dog" in answer["content"]
    assert (await bot.engine.channel_settings(f"discord:{CHANNEL_ID}")).persona == PERSONA

    await answer_to(fake, f"{MENTION} what do you do on weekends?", mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} and in this thread?", channel_id=THREAD_ID, mentions=(BOT_ID,))
    await answer_to(fake, f"{MENTION} and elsewhere?", channel_id=OTHER_CHANNEL_ID, mentions=(BOT_ID,))
    assert personas(bot) == [PERSONA, PERSONA, ()]  # #random has none of its own, and there is no PERSONA

    shown = await blenderbot(fake, "show")
    assert "Persona: its own: I love hiking | I have a dog" in shown["content"] and "Listening: off" in shown["content"]
    assert (await blenderbot(fake, "reset"))["content"].startswith("Done")
    await answer_to(fake, f"{MENTION} who are you now?", mentions=(BOT_ID,))
    assert personas(bot)[-1] == ()


async def test_a_member_without_manage_channels_is_refused_and_nothing_changes(fake, start_bot):
    bot = await start_bot(persona=("I am a robot",))
    for verb, options in (("persona", {"text": "I am a pirate"}), ("listen", {"mode": "on"}), ("reset", {})):
        answer = await blenderbot(fake, verb, permissions=MEMBER_PERMISSIONS, **options)
        assert answer["content"] == NOT_A_MODERATOR and answer["flags"] & EPHEMERAL
    assert await bot.engine.channel_settings(f"discord:{CHANNEL_ID}") == ChannelSettings()
    await answer_to(fake, f"{MENTION} who are you?", mentions=(BOT_ID,))
    assert personas(bot) == [("I am a robot",)]  # the default, PERSONA


async def test_an_unsafe_or_too_long_persona_is_refused_and_nothing_is_stored(fake, start_bot):
    bot = await start_bot()
    unsafe = await blenderbot(fake, "persona", text="I love hiking | I am a zorblax")
    assert "safety filter" in unsafe["content"]
    long = await blenderbot(fake, "persona", text="|".join(["i like to read books and play the guitar."] * 12))
    assert "may be at most" in long["content"] and "tokens" in long["content"]
    assert await bot.engine.channel_settings(f"discord:{CHANNEL_ID}") == ChannelSettings()


async def test_a_listening_channel_answers_every_message_and_a_normal_one_does_not(fake, start_bot):
    bot = await start_bot(discord_message_content=True)
    # Not listening yet: a message that does not mention the bot stays unanswered.
    await fake.send_message("anyone up for a hike?")
    await settle(fake)
    assert fake.created(CHANNEL_ID) == []

    assert (await blenderbot(fake, "listen", mode="on"))["content"].startswith("Done: I answer every message")
    _, [reply] = await answer_to(fake, "anyone up for a hike?")
    assert reply.json["content"].strip()
    _, [in_thread] = await answer_to(fake, "what about this thread?", channel_id=THREAD_ID)  # a thread of #general
    assert in_thread.json["content"].strip()
    assert bot.model_saw()[-2:] == ["anyone up for a hike?", "what about this thread?"]

    # Said to someone else, by another bot, or in a channel that does not listen: no answer.
    before = len(fake.created(CHANNEL_ID))
    await fake.send_message(f"<@{OTHER_USER_ID}> are you coming?", mentions=(OTHER_USER_ID,))
    theirs = await fake.send_message("I'll bring snacks", author_id=OTHER_USER_ID)
    await fake.send_message("sounds good!", reply_to=theirs)
    await fake.send_message("beep boop", author_id=OTHER_BOT_ID)
    await fake.send_message("is anyone here?", channel_id=OTHER_CHANNEL_ID)
    await fake.send_message("the bot answers this one")  # answered after the ones above: in line
    await fake.wait_for(lambda: len(fake.created(CHANNEL_ID)) >= before + 2, what="two answers")
    await settle(fake)
    # Of those, only the other person's plain message was heard (the reply to it was not), and the last.
    assert len(fake.created(CHANNEL_ID)) == before + 2
    saw = bot.model_saw()
    assert saw.index("I'll bring snacks") < saw.index("the bot answers this one")
    assert not {"are you coming?", "sounds good!", "beep boop", "is anyone here?"} & set(saw)

    assert (await blenderbot(fake, "listen", mode="off"))["content"].startswith("Done")
    await fake.send_message("still there?")
    await settle(fake)
    assert len(fake.created(CHANNEL_ID)) == before + 2


async def test_listening_without_the_message_content_intent_is_refused_saying_what_to_enable(fake, start_bot):
    bot = await start_bot()  # DISCORD_MESSAGE_CONTENT off
    answer = await blenderbot(fake, "listen", mode="on")
    assert answer["content"] == LISTEN_NEEDS_INTENT
    assert "Message Content intent" in answer["content"] and "DISCORD_MESSAGE_CONTENT=on" in answer["content"]
    assert not (await bot.engine.channel_settings(f"discord:{CHANNEL_ID}")).listen
    assert (await blenderbot(fake, "listen", mode="off"))["content"].startswith("Done")  # off needs nothing


async def test_forgetting_a_dm_forgets_its_persona_but_reset_in_a_channel_keeps_the_channels(fake, start_bot):
    bot = await start_bot()
    # In their own DM with the bot a person may give it a persona (no server permissions there).
    answer = await blenderbot(fake, "persona", permissions=0, channel_id=DM_CHANNEL_ID, text="I am a pirate")
    assert answer["content"].startswith("Done")
    await answer_to(fake, "ahoy!", channel_id=DM_CHANNEL_ID)
    assert personas(bot) == [("I am a pirate",)]
    await blenderbot(fake, "persona", text="I love hiking")
    await answer_to(fake, f"{MENTION} hello", mentions=(BOT_ID,))

    _, [done] = await answer_to(fake, "forget", channel_id=DM_CHANNEL_ID)
    assert done.json["content"] == RESET_DONE
    assert await bot.engine.channel_settings(f"discord:{DM_CHANNEL_ID}") == ChannelSettings()
    assert await bot.engine.history(f"discord:{DM_CHANNEL_ID}") == []
    # `reset` in a server channel forgets the conversation, not what its moderators chose.
    await answer_to(fake, f"{MENTION} reset", mentions=(BOT_ID,))
    assert (await bot.engine.channel_settings(f"discord:{CHANNEL_ID}")).persona == ("I love hiking",)
