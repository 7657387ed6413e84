"""Discord's app features over the real discord.py client and the local fake
(tests/fake_discord.py): 👍 / 👎 reactions as ratings, the "Ask BlenderBot"
message context menu, and the commands through a user's install of the app."""

from __future__ import annotations

import asyncio
import time

from fake_discord import (
    BOT_ID,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    EPHEMERAL,
    FOREIGN_CHANNEL_ID,
    GROUP_DM_ID,
    OTHER_USER_ID,
    USER_ID,
)
from test_discord import MENTION, answer_to, fake, settle, start_bot  # noqa: F401 (fixtures)
from test_feedback import counted

from adapters.discord import ASK_COMMAND, HELP_TEXT, RESET_DONE, DiscordAdapter
from adapters.discord_feedback import rating_for
from bot.memory import ExchangeRef

THUMBS_UP, THUMBS_DOWN = "\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"


async def eventually(condition, *, timeout: float = 30.0, what: str = "condition"):
    """Poll an async `condition()` until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def ratings(bot) -> list:
    return await bot.engine.store.list_feedback()


# -- reactions --------------------------------------------------------------------


def test_thumbs_in_any_skin_tone_are_ratings_and_other_emoji_are_not():
    assert rating_for(THUMBS_UP) == "good" and rating_for(THUMBS_DOWN + "\U0001f3fd") == "bad"
    assert rating_for(THUMBS_UP + "\ufe0f") == "good"
    assert rating_for("\N{HEAVY BLACK HEART}") is None and rating_for("") is None


async def test_thumbs_up_on_the_bots_reply_is_recorded_against_its_exchange_and_counted(fake, start_bot):
    bot = await start_bot()
    await answer_to(fake, f"{MENTION} first question", mentions=(BOT_ID,))
    _, [reply] = await answer_to(fake, f"{MENTION} second question", mentions=(BOT_ID,))
    first, second = await bot.engine.history(f"discord:{CHANNEL_ID}")

    await fake.react(int(reply.response["id"]), THUMBS_UP, user_id=OTHER_USER_ID)
    [row] = await eventually(lambda: ratings(bot), what="the rating")
    assert (row.exchange, row.rating, row.user, row.platform) == (
        ExchangeRef(f"discord:{CHANNEL_ID}", second.id), "good", str(OTHER_USER_ID), "discord")
    assert counted(bot.engine, "discord", "good") == 1
    # Known from sending it: no REST call was needed to tell which exchange it was.
    assert not [c for c in fake.calls if c.method == "GET" and "/messages/" in c.path]


async def test_reaction_on_someone_elses_message_or_a_notice_is_not_recorded(fake, start_bot):
    bot = await start_bot()
    human, [reply] = await answer_to(fake, f"{MENTION} hello", mentions=(BOT_ID,))
    await fake.react(human, THUMBS_DOWN, user_id=OTHER_USER_ID)  # the user's message, not the bot's
    await fake.react(int(reply.response["id"]), "\N{HEAVY BLACK HEART}")  # not a rating
    _, [notice] = await answer_to(fake, f"{MENTION} reset", mentions=(BOT_ID,))
    await fake.react(int(notice.response["id"]), THUMBS_DOWN)  # "I've forgotten...": no exchange
    await settle(fake)
    await asyncio.sleep(0.3)
    assert await ratings(bot) == []
    assert counted(bot.engine, "discord", "bad") == 0 and counted(bot.engine, "discord", "good") == 0


async def test_a_reply_sent_before_a_restart_is_found_by_the_message_it_answers(
    fake, start_bot, tiny_model, make_settings
):
    bot = await start_bot()
    _, [reply] = await answer_to(fake, f"{MENTION} hello from before", mentions=(BOT_ID,))
    [exchange] = await bot.engine.history(f"discord:{CHANNEL_ID}")
    await bot.adapter.close()
    # A new process: same memory, no knowledge of which message was which reply.
    restarted = DiscordAdapter(bot.adapter.settings, bot.engine)
    await restarted.start()
    try:
        await fake.react(int(reply.response["id"]), THUMBS_DOWN + "\U0001f3fb")
        [row] = await eventually(lambda: ratings(bot), what="the rating")
        assert (row.exchange, row.rating) == (ExchangeRef(f"discord:{CHANNEL_ID}", exchange.id), "bad")
        assert [c.path for c in fake.calls if c.method == "GET" and "/messages/" in c.path] == [
            f"/channels/{CHANNEL_ID}/messages/{reply.response['id']}"]
    finally:
        restarted.stop_accepting()
        await restarted.drain(10)
        await restarted.close()


async def test_reactions_of_blocked_users_are_ignored(fake, start_bot):
    bot = await start_bot(blocked_users=frozenset({str(OTHER_USER_ID)}))
    _, [reply] = await answer_to(fake, f"{MENTION} hello", mentions=(BOT_ID,))
    await fake.react(int(reply.response["id"]), THUMBS_UP, user_id=OTHER_USER_ID)
    await fake.react(int(reply.response["id"]), THUMBS_DOWN, user_id=USER_ID)
    [row] = await eventually(lambda: ratings(bot), what="the other rating")
    await asyncio.sleep(0.3)
    assert [(r.user, r.rating) for r in await ratings(bot)] == [(str(USER_ID), "bad")] == [(row.user, row.rating)]


# -- installs and contexts -------------------------------------------------------------


async def test_every_command_is_registered_for_server_and_user_installs_in_every_context(fake, start_bot):
    await start_bot()
    commands = {command["name"]: command for command in fake.commands}
    assert set(commands) == {"reset", "help", ASK_COMMAND, "blenderbot"}  # /blenderbot: tests/test_community.py
    assert commands[ASK_COMMAND]["type"] == 3  # a message context menu
    for command in (commands["reset"], commands["help"], commands[ASK_COMMAND]):
        assert sorted(command["integration_types"]) == [0, 1]  # server install, user install
        assert sorted(command["contexts"]) == [0, 1, 2]  # servers, the bot's DM, other DMs and group DMs


# -- the "Ask BlenderBot" context menu ----------------------------------------------------


async def test_context_menu_is_deferred_then_answered_by_a_followup_in_the_channel(fake, start_bot):
    bot = await start_bot()
    # Someone else's message, not addressed to the bot: only the context menu brings it to the bot.
    message = await fake.send_message("what is the best cheese?", author_id=OTHER_USER_ID)
    interaction = await fake.context_menu(ASK_COMMAND, message)
    calls = await fake.wait_for(lambda: (c := fake.interaction_calls(interaction)) and len(c) >= 2 and c,
                                what="the callback and the followup")
    callback, followup = calls[0], calls[1]
    assert callback.json["type"] == 5  # deferred: "BlenderBot is thinking..."
    assert not callback.json.get("data", {}).get("flags", 0) & EPHEMERAL  # the bot is a member here: public
    assert followup.method == "POST" and followup.json["content"].strip()
    assert not followup.json.get("flags", 0) & EPHEMERAL
    assert followup.json["allowed_mentions"]["parse"] == []
    assert bot.model_saw() == ["what is the best cheese?"]
    [exchange] = await bot.engine.history(f"discord:{CHANNEL_ID}")
    assert exchange.user == "what is the best cheese?"
    # Its answer can be rated like any reply.
    await fake.react(int(followup.response["id"]), THUMBS_UP)
    [row] = await eventually(lambda: ratings(bot), what="the rating")
    assert row.exchange == ExchangeRef(f"discord:{CHANNEL_ID}", exchange.id)


async def test_context_menu_through_a_user_install_in_a_group_dm_answers_only_the_asker(fake, start_bot):
    bot = await start_bot()
    message = await fake.send_message("tell me about volcanoes", channel_id=GROUP_DM_ID, author_id=OTHER_USER_ID)
    interaction = await fake.context_menu(ASK_COMMAND, message)
    calls = await fake.wait_for(lambda: (c := fake.interaction_calls(interaction)) and len(c) >= 2 and c,
                                what="the callback and the followup")
    assert calls[0].json["type"] == 5 and calls[0].json["data"]["flags"] & EPHEMERAL
    assert calls[1].json["flags"] & EPHEMERAL and calls[1].json["content"].strip()
    assert bot.model_saw() == ["tell me about volcanoes"]
    # Only the asker saw it: a conversation of their own, apart from anyone else's in that DM.
    assert len(await bot.engine.history(f"discord:{GROUP_DM_ID}:user:{USER_ID}")) == 1
    assert await bot.engine.history(f"discord:{GROUP_DM_ID}") == []


async def test_context_menu_on_a_message_without_text_says_so(fake, start_bot):
    bot = await start_bot()
    message = await fake.send_message("", author_id=OTHER_USER_ID)
    interaction = await fake.context_menu(ASK_COMMAND, message)
    calls = await fake.wait_for(lambda: (c := fake.interaction_calls(interaction)) and len(c) >= 2 and c,
                                what="the answer")
    assert "no text" in calls[1].json["content"]
    assert bot.model.batches == []


async def test_slash_commands_work_through_a_user_install_in_a_dm_and_a_foreign_server(fake, start_bot):
    bot = await start_bot()
    for channel in (GROUP_DM_ID, FOREIGN_CHANNEL_ID):
        message = await fake.send_message("remember the word kiwi", channel_id=channel, author_id=OTHER_USER_ID)
        asked = await fake.context_menu(ASK_COMMAND, message)
        await fake.wait_for(lambda a=asked: len(fake.interaction_calls(a)) >= 2, what="the answer")
        conversation = f"discord:{channel}:user:{USER_ID}"
        assert len(await bot.engine.history(conversation)) == 1

        helped = await fake.slash_command("help", channel_id=channel)
        [answer] = await fake.wait_for(lambda h=helped: fake.interaction_calls(h), what="/help")
        assert answer.json["data"]["content"] == HELP_TEXT and answer.json["data"]["flags"] & EPHEMERAL

        reset = await fake.slash_command("reset", channel_id=channel)
        calls = await fake.wait_for(lambda r=reset: (c := fake.interaction_calls(r)) and len(c) >= 2 and c,
                                    what="/reset")
        assert calls[0].json["data"]["flags"] & EPHEMERAL  # only the user's own conversation there
        assert calls[1].json["content"] == RESET_DONE
        assert await bot.engine.history(conversation) == []


async def test_context_menu_in_the_bots_own_dm_is_public_and_shares_the_dms_memory(fake, start_bot):
    bot = await start_bot()
    await answer_to(fake, "my favourite fruit is kiwi", channel_id=DM_CHANNEL_ID)
    message = await fake.send_message("what did I just say?", channel_id=DM_CHANNEL_ID)
    await fake.wait_for(lambda: len(fake.created(DM_CHANNEL_ID)) >= 2, what="the DM answer")
    interaction = await fake.context_menu(ASK_COMMAND, message)
    calls = await fake.wait_for(lambda: (c := fake.interaction_calls(interaction)) and len(c) >= 2 and c,
                                what="the answer")
    assert not calls[0].json.get("data", {}).get("flags", 0) & EPHEMERAL
    assert len(await bot.engine.history(f"discord:{DM_CHANNEL_ID}")) == 3
