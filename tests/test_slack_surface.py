"""Slack's AI-app surface (adapters/slack_surface.py) through the real slack_bolt /
slack_sdk against the local fake of Slack: the thinking status and its hourglass
fallback, suggested prompts and the greeting, the Home tab and its forget button,
feedback buttons clicked over HTTP (signed) and Socket Mode."""

from __future__ import annotations

import asyncio
import json
import logging

from fake_slack import (
    FakeSlack,
    block_actions,
    clicked,
    dm,
    event_body,
    form_body,
    home_opened,
    json_blocks,
    mention,
    message_of,
    signed_headers,
    thread_started,
    wait_for,
)
from test_feedback import counted
from test_slack import SECRET, Bot, answered, fake, start_bot  # noqa: F401 (fixtures)

from adapters.slack_surface import (
    PROGRESS_REACTION,
    FEEDBACK_ACTION,
    FORGET_ACTION,
    FORGOTTEN,
    GREETING,
    LOADING_MESSAGES,
    NOT_KEPT,
    PROMPTS_TITLE,
    STATUS,
    THANKS,
)
from bot.config import DEFAULT_SLACK_PROMPTS
from bot.memory import ExchangeRef


async def click(bot: Bot, payload: dict) -> int:
    """POST a block_actions payload the way Slack does in HTTP mode (form-encoded, signed)."""
    raw = form_body(payload)
    status, _ = await bot.send(raw, headers=signed_headers(SECRET, raw,
                                                         content_type="application/x-www-form-urlencoded"))
    return status


def ephemerals(fake: FakeSlack) -> list:
    return fake.calls_to("chat.postEphemeral")


def order(fake: FakeSlack, *calls) -> list[int]:
    """Where each call came among all Web API calls (by identity: equal calls repeat)."""
    return [next(i for i, seen in enumerate(fake.calls) if seen is call) for call in calls]


# -- the thinking status -----------------------------------------------------------


async def test_status_is_set_then_cleared_around_a_reply_in_a_dm(start_bot, fake):
    bot = await start_bot()
    event = dm("hello, are you there?")
    await bot.send(event_body(event))
    [post] = await answered(fake)
    shown, cleared = fake.status_calls("D1")
    assert (shown.params["thread_ts"], shown.params["status"], shown.params["loading_messages"]) == (
        event["ts"], STATUS, LOADING_MESSAGES)
    assert (cleared.params["thread_ts"], cleared.params["status"]) == (event["ts"], "")
    first, then, last = order(fake, shown, post, cleared)
    assert first < then < last
    assert fake.calls_to("reactions.add") == []  # never both


async def test_status_is_set_then_cleared_around_a_reply_in_a_thread(start_bot, fake):
    bot = await start_bot()
    top = mention("start a thread")
    await bot.send(event_body(top))
    await answered(fake, 1)
    follow_up = mention("and in the thread", thread_ts=top["ts"])
    await bot.send(event_body(follow_up))
    posts = await answered(fake, 2)
    assert posts[1].params["thread_ts"] == top["ts"]
    calls = fake.status_calls("C1")
    assert [(c.params["thread_ts"], c.params["status"]) for c in calls] == [
        (top["ts"], STATUS), (top["ts"], ""), (top["ts"], STATUS), (top["ts"], "")]
    first, then, last = order(fake, calls[2], posts[1], calls[3])
    assert first < then < last
    assert fake.calls_to("reactions.add") == []


async def test_a_second_reply_still_on_its_way_keeps_the_status_up(start_bot, fake):
    bot = await start_bot(delay=0.5, echo=True)
    top = mention("first")
    await bot.send(event_body(top))
    await bot.send(event_body(mention("second", thread_ts=top["ts"])))
    await answered(fake, 2)
    statuses = [c.params["status"] for c in fake.status_calls("C1")]
    # Up for both; after the first answer (which clears it on Slack) back up; cleared after the last.
    assert statuses == [STATUS, STATUS, STATUS, ""]


async def test_hourglass_when_the_status_scope_is_missing_and_it_is_logged_once(start_bot, fake, caplog):
    caplog.set_level(logging.WARNING, logger="adapters")
    fake.missing_scopes.add("assistant:write")
    bot = await start_bot(echo=True)
    events = [dm("one"), dm("two"), mention("three")]
    for count, event in enumerate(events, 1):
        await bot.send(event_body(event))
        await answered(fake, count)
    added = [(c.params["channel"], c.params["timestamp"], c.params["name"]) for c in fake.calls_to("reactions.add")]
    assert added == [(e["channel"], e["ts"], PROGRESS_REACTION) for e in events]
    assert len(fake.calls_to("reactions.remove")) == 3
    # Tried once, then left alone rather than failing on every message; one warning naming the scope.
    assert len(fake.status_calls()) == 0 and len(fake.calls_to("assistant.threads.setStatus", ok_only=False)) == 1
    warnings = [r.getMessage() for r in caplog.records if "assistant.threads.setStatus" in r.getMessage()]
    assert len(warnings) == 1 and "assistant:write" in warnings[0]
    assert all("one" not in w and "two" not in w for w in warnings)


async def test_without_any_scope_for_hints_the_answer_still_arrives(start_bot, fake):
    fake.missing_scopes |= {"assistant:write", "reactions:write"}
    bot = await start_bot()
    await bot.send(event_body(dm("hello")))
    [post] = await answered(fake)
    assert post.params["text"].strip()
    assert len(fake.calls_to("reactions.remove", ok_only=False)) == 0  # nothing added, nothing to remove


# -- starting a DM: suggested prompts and a greeting once -----------------------------


async def test_messages_tab_shows_suggested_prompts_and_greets_once(start_bot, fake):
    bot = await start_bot()
    for _ in range(3):
        assert (await bot.send(event_body(home_opened("messages"))))[0] == 200
    await wait_for(lambda: len(fake.calls_to("assistant.threads.setSuggestedPrompts")) == 3, what="prompts")
    prompts = fake.calls_to("assistant.threads.setSuggestedPrompts")[0].params
    assert prompts["channel_id"] == "D1" and prompts["title"] == PROMPTS_TITLE
    assert [p["message"] for p in prompts["prompts"]] == list(DEFAULT_SLACK_PROMPTS)
    await bot.send(event_body(home_opened("messages", user="U3", channel="D3")))  # someone else
    await wait_for(lambda: len(fake.posts) == 2, what="the second person's greeting")
    await asyncio.sleep(0.3)  # a third greeting would have been posted by now
    assert [(p.params["channel"], p.params["text"]) for p in fake.posts] == [("D1", GREETING), ("D3", GREETING)]
    assert bot.model.inputs == []  # a greeting is no exchange: not stored, no model call
    assert await bot.engine.history("slack:T1:D1") == []


async def test_no_greeting_for_someone_who_already_talked_with_the_bot(start_bot, fake):
    bot = await start_bot(slack_suggested_prompts=("How are you?",))
    await bot.send(event_body(dm("hello")))
    await answered(fake)
    await bot.send(event_body(home_opened("messages")))
    await wait_for(lambda: fake.calls_to("assistant.threads.setSuggestedPrompts"), what="prompts")
    assert [p["title"] for p in fake.calls_to("assistant.threads.setSuggestedPrompts")[0].params["prompts"]] == [
        "How are you?"]
    await asyncio.sleep(0.3)
    assert len(fake.posts) == 1  # only the answer


async def test_assistant_thread_started_gets_prompts_and_greeting_in_the_thread(start_bot, fake):
    bot = await start_bot(socket_mode=True)
    event = thread_started(channel="D5")
    envelope = await fake.send_envelope(event_body(event))
    await wait_for(lambda: fake.acked(envelope), what="the ack")
    [greeting] = await wait_for(lambda: fake.posts, what="the greeting")
    thread = event["assistant_thread"]["thread_ts"]
    assert (greeting.params["channel"], greeting.params["thread_ts"], greeting.params["text"]) == ("D5", thread,
                                                                                                   GREETING)
    [prompts] = fake.calls_to("assistant.threads.setSuggestedPrompts")
    assert (prompts.params["channel_id"], prompts.params["thread_ts"]) == ("D5", thread)
    again = await fake.send_envelope(event_body(thread_started(channel="D5")))
    await wait_for(lambda: fake.acked(again) and len(fake.calls_to("assistant.threads.setSuggestedPrompts")) == 2,
                   what="the second thread's prompts")
    await asyncio.sleep(0.3)
    assert len(fake.posts) == 1
    assert bot.model.inputs == []


async def test_prompts_can_be_turned_off_and_blocked_users_get_nothing(start_bot, fake):
    bot = await start_bot(slack_suggested_prompts=(), blocked_users=frozenset({"U3"}))
    await bot.send(event_body(home_opened("messages")))
    await bot.send(event_body(home_opened("messages", user="U3", channel="D3")))
    await bot.send(event_body(home_opened("home", user="U3", channel="D3")))
    await wait_for(lambda: fake.posts, what="the greeting")
    await asyncio.sleep(0.3)
    assert fake.calls_to("assistant.threads.setSuggestedPrompts") == []
    assert [p.params["channel"] for p in fake.posts] == ["D1"]
    assert fake.home_views == {}


# -- the Home tab ---------------------------------------------------------------


def forget_button(view: dict) -> dict:
    return next(element for block in view["blocks"] if block["type"] == "actions"
                for element in block["elements"] if element["action_id"] == FORGET_ACTION)


async def test_home_tab_says_what_the_bot_keeps_and_its_button_forgets_the_users_dm(start_bot, fake):
    bot = await start_bot(memory_max_turns=7, memory_ttl=14 * 86400.0)
    await bot.send(event_body(dm("remember that I like tea")))
    await bot.send(event_body(dm("someone else's DM", user="U3", channel="D3")))
    await answered(fake, 2)
    assert (await bot.send(event_body(home_opened("home"))))[0] == 200
    view = await wait_for(lambda: fake.home_views.get("U2"), what="the Home tab")
    text = json.dumps(view)
    assert "BlenderBot" in text and "last 7 exchanges" in text and "14 days" in text
    button = forget_button(view)
    assert button["style"] == "danger" and button["confirm"]["confirm"]["text"] == "Forget"

    # The click is signed and acked at once; then the DM is forgotten, and nothing else.
    assert await click(bot, block_actions({"type": "button", "action_id": FORGET_ACTION, "block_id": "b",
                                           "value": button["value"]}, view=view)) == 200
    await wait_for(lambda: "Done" in json.dumps(fake.home_views["U2"]), what="the confirmation on the Home tab")
    assert FORGOTTEN in json.dumps(fake.home_views["U2"])
    assert await bot.engine.history("slack:T1:D1") == []
    assert len(await bot.engine.history("slack:T1:D3")) == 1


async def test_forget_button_with_a_value_that_is_not_a_dm_of_this_workspace_does_nothing(start_bot, fake):
    bot = await start_bot(slack_reply_in_thread=False)
    await bot.send(event_body(mention("a shared channel conversation")))
    await answered(fake)
    for value in ("slack:T1:C1", "slack:T9:D1", "nonsense"):
        assert await click(bot, block_actions({"type": "button", "action_id": FORGET_ACTION, "value": value},
                                              view={"type": "home"})) == 200
    await asyncio.sleep(0.3)
    assert len(await bot.engine.history("slack:T1:C1")) == 1
    assert fake.home_views == {}


# -- feedback buttons -------------------------------------------------------------


async def test_every_reply_carries_feedback_buttons_but_errors_do_not(start_bot, fake):
    bot = await start_bot(max_input_chars=40)
    await bot.send(event_body(dm("hello")))
    await answered(fake, 1)
    await bot.send(event_body(dm("this message is much longer than forty characters")))
    posts = await answered(fake, 2)
    blocks = json_blocks(posts[0])
    assert [b["type"] for b in blocks] == ["section", "context_actions"]
    assert blocks[0]["text"]["text"] == posts[0].params["text"]
    buttons = blocks[1]["elements"][0]
    assert buttons["type"] == "feedback_buttons" and buttons["action_id"] == FEEDBACK_ACTION
    assert "too long" in posts[1].params["text"] and not json_blocks(posts[1])


async def test_http_feedback_click_is_acked_stored_against_its_exchange_counted_and_acknowledged(start_bot, fake):
    bot = await start_bot(echo=True)
    top = mention("first question")
    await bot.send(event_body(top))
    await answered(fake, 1)
    await bot.send(event_body(mention("second question", thread_ts=top["ts"])))
    posts = await answered(fake, 2)
    conversation = f"slack:T1:C1:{top['ts']}"
    first, second = await bot.engine.history(conversation)

    payload = block_actions(clicked(posts[1], "bad"), user="U3", message=message_of(posts[1]), channel="C1")
    assert await click(bot, payload) == 200
    [note] = await wait_for(lambda: ephemerals(fake), what="the note to the clicker")
    assert (note.params["user"], note.params["channel"], note.params["thread_ts"]) == ("U3", "C1", top["ts"])
    assert note.params["text"] == THANKS["bad"]
    [row] = await bot.engine.store.list_feedback()
    assert (row.exchange, row.rating, row.user, row.platform) == (ExchangeRef(conversation, second.id), "bad", "U3",
                                                                  "slack")
    assert counted(bot.engine, "slack", "bad") == 1 and counted(bot.engine, "slack", "good") == 0
    assert first.id != second.id


async def test_socket_mode_feedback_click_is_acked_stored_and_counted(start_bot, fake):
    bot = await start_bot(socket_mode=True)
    envelope = await fake.send_envelope(event_body(dm("hello over the socket")))
    await wait_for(lambda: fake.acked(envelope), what="the event's ack")
    [post] = await answered(fake)
    click_id = await fake.send_interactive(block_actions(clicked(post, "good"), message=message_of(post),
                                                         channel="D1"))
    await wait_for(lambda: fake.acked(click_id), what="the click's ack")
    [note] = await wait_for(lambda: ephemerals(fake), what="the note to the clicker")
    assert note.params["text"] == THANKS["good"] and note.params.get("thread_ts") is None
    [exchange] = await bot.engine.history("slack:T1:D1")
    [row] = await bot.engine.store.list_feedback()
    assert (row.exchange, row.rating, row.user) == (ExchangeRef("slack:T1:D1", exchange.id), "good", "U2")
    assert counted(bot.engine, "slack", "good") == 1


async def test_feedback_on_a_forgotten_conversation_is_neither_kept_nor_counted_and_says_so(start_bot, fake):
    bot = await start_bot()
    await bot.send(event_body(dm("hello")))
    [post] = await answered(fake)
    await bot.send(event_body(dm("forget")))
    await answered(fake, 2)
    assert await click(bot, block_actions(clicked(post, "bad"), message=message_of(post), channel="D1")) == 200
    [note] = await wait_for(lambda: ephemerals(fake), what="the note")
    assert note.params["text"] == NOT_KEPT
    assert await bot.engine.store.list_feedback() == []
    assert counted(bot.engine, "slack", "bad") == 0  # the metric counts stored ratings only, as /api/feedback does


async def test_forged_or_foreign_feedback_values_are_ignored(start_bot, fake):
    bot = await start_bot(blocked_users=frozenset({"U9"}))
    await bot.send(event_body(dm("hello")))
    [post] = await answered(fake)
    genuine = clicked(post, "good")
    for action, user in (({**genuine, "value": "great|1.0|slack:T1:D1"}, "U2"),
                         ({**genuine, "value": "good|not an id|slack:T1:D1"}, "U2"),
                         ({**genuine, "value": "good||slack:T1:D1"}, "U2"),
                         ({**genuine, "value": genuine["value"].replace("slack:T1:", "slack:T9:")}, "U2"),
                         (genuine, "U9")):
        assert await click(bot, block_actions(action, user=user, message=message_of(post), channel="D1")) == 200
    await asyncio.sleep(0.3)
    assert await bot.engine.store.list_feedback() == [] and ephemerals(fake) == []
    assert counted(bot.engine, "slack", "good") == 0


# -- the manifest -------------------------------------------------------------------


async def test_manifest_subscribes_to_exactly_the_events_the_bot_handles(start_bot, fake):
    import yaml

    from conftest import REPO

    manifest = yaml.safe_load((REPO / "slack-manifest.yml").read_text())
    events = manifest["settings"]["event_subscriptions"]["bot_events"]
    scopes = manifest["oauth_config"]["scopes"]["bot"]
    assert sorted(scopes) == ["app_mentions:read", "assistant:write", "chat:write", "im:history", "reactions:write",
                              "users:read"]
    assert manifest["settings"]["interactivity"]["is_enabled"] and manifest["features"]["app_home"]["home_tab_enabled"]
    assert "assistant_view" in manifest["features"]
    bot = await start_bot(slack_suggested_prompts=())
    samples = {"app_home_opened": home_opened("messages"), "app_mention": mention("hi"),
               "assistant_thread_started": thread_started(), "message.im": dm("hi")}
    assert sorted(events) == sorted(samples)
    for name in events:
        # Bolt answers 404 to an event no listener takes; Slack then counts a failure and retries.
        assert (await bot.send(event_body(samples[name])))[0] == 200, name
    unsubscribed = {"type": "reaction_added", "user": "U2", "reaction": "+1", "event_ts": "1.2",
                    "item": {"type": "message", "channel": "C1", "ts": "1.1"}}
    assert (await bot.send(event_body(unsubscribed)))[0] == 404
    await answered(fake, 2)
