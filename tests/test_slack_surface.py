"""Slack's AI-app surface (adapters/slack_surface.py) through the real slack_bolt /
slack_sdk against the local fake of Slack: the thinking status and its hourglass
fallback, suggested prompts and the greeting, the Home tab and its forget button,
feedback buttons clicked over HTTP (signed) and Socket Mode. Slack's agent experience by default
(a DM answered in the thread of its message); the legacy assistant experience still served."""

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
    FEEDBACK_ACTION,
    FORGET_ACTION,
    FORGOTTEN,
    GREETING,
    LOADING_MESSAGES,
    NOT_KEPT,
    PROGRESS_REACTION,
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


# -- the thinking status: on the thread the answer goes to ----------------------------------


async def test_a_dm_is_answered_in_the_thread_of_the_message_with_the_status_there(start_bot, fake):
    """Slack's agent experience: the user's message is the root of a thread, the answer goes in it
    (Slack's agent samples: `thread_ts or ts`), and the thinking status is on that same thread."""
    bot = await start_bot()
    event = dm("hello, are you there?")
    await bot.send(event_body(event))
    [post] = await answered(fake)
    assert (post.params["channel"], post.params["thread_ts"]) == ("D1", event["ts"])
    shown, cleared = fake.status_calls("D1")
    assert (shown.params["thread_ts"], shown.params["status"], shown.params["loading_messages"]) == (
        event["ts"], STATUS, LOADING_MESSAGES)
    assert (cleared.params["thread_ts"], cleared.params["status"]) == (event["ts"], "")
    first, then, last = order(fake, shown, post, cleared)
    assert first < then < last
    assert fake.statuses == {("D1", event["ts"]): ""}  # nothing left behind anywhere
    assert fake.calls_to("reactions.add") == []  # never both


async def test_a_reply_in_a_dm_thread_is_answered_in_that_thread(start_bot, fake):
    bot = await start_bot(echo=True)
    top = dm("first")
    await bot.send(event_body(top))
    await answered(fake, 1)
    reply = dm("and in the thread", thread_ts=top["ts"])
    await bot.send(event_body(reply))
    posts = await answered(fake, 2)
    assert (posts[1].params["thread_ts"], posts[1].params["text"]) == (top["ts"], "re: and in the thread")
    assert [(c.params["thread_ts"], c.params["status"]) for c in fake.status_calls("D1")] == [
        (top["ts"], STATUS), (top["ts"], ""), (top["ts"], STATUS), (top["ts"], "")]
    assert fake.calls_to("reactions.add") == []
    # One memory per DM, whichever thread the user writes in.
    assert [e.user for e in await bot.engine.history("slack:T1:D1")] == ["first", "and in the thread"]


async def test_status_is_set_then_cleared_around_a_reply_in_a_thread(start_bot, fake):
    bot = await start_bot()
    top = mention("start a thread")
    await bot.send(event_body(top))
    await answered(fake, 1)
    follow_up = mention("and in the thread", thread_ts=top["ts"])
    await bot.send(event_body(follow_up))
    posts = await answered(fake, 2)
    assert [p.params["thread_ts"] for p in posts] == [top["ts"], top["ts"]]
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


async def test_the_status_takes_chat_write_and_a_missing_assistant_write_costs_only_the_prompts(
        start_bot, fake, caplog):
    caplog.set_level(logging.WARNING, logger="adapters")
    fake.missing_scopes.add("assistant:write")
    bot = await start_bot(echo=True, slack_suggested_prompts=("How are you?",))
    events = [dm("one"), mention("two")]
    for count, event in enumerate(events, 1):
        await bot.send(event_body(event))
        await answered(fake, count)
    assert [(c.params["channel_id"], c.params["thread_ts"], c.params["status"]) for c in fake.status_calls()] == [
        ("D1", events[0]["ts"], STATUS), ("D1", events[0]["ts"], ""),
        ("C1", events[1]["ts"], STATUS), ("C1", events[1]["ts"], "")]
    assert fake.calls_to("reactions.add", ok_only=False) == []
    # The prompts need assistant:write: refused, said once with the scope's name; the greeting still comes.
    await bot.send(event_body(home_opened("messages", user="U3", channel="D3")))
    await wait_for(lambda: [p for p in fake.posts if p.params["channel"] == "D3"], what="the greeting")
    assert fake.suggested == {}
    warnings = [r.getMessage() for r in caplog.records if "setSuggestedPrompts" in r.getMessage()]
    assert len(warnings) == 1 and "assistant:write" in warnings[0]


async def test_hourglass_only_where_the_answer_has_no_thread(start_bot, fake):
    bot = await start_bot(slack_reply_in_thread=False, echo=True)
    in_channel, direct = mention("in the channel"), dm("in a DM")
    await bot.send(event_body(in_channel))
    await answered(fake, 1)
    await bot.send(event_body(direct))
    posts = await answered(fake, 2)
    assert "thread_ts" not in posts[0].params and posts[1].params["thread_ts"] == direct["ts"]
    added = [(c.params["channel"], c.params["timestamp"], c.params["name"]) for c in fake.calls_to("reactions.add")]
    assert added == [("C1", in_channel["ts"], PROGRESS_REACTION)]
    assert len(fake.calls_to("reactions.remove")) == 1
    assert [(c.params["channel_id"], c.params["thread_ts"]) for c in fake.status_calls()] == [
        ("D1", direct["ts"]), ("D1", direct["ts"])]


async def test_without_the_reactions_scope_the_answer_in_the_channel_still_arrives(start_bot, fake):
    fake.missing_scopes.add("reactions:write")
    bot = await start_bot(slack_reply_in_thread=False)
    await bot.send(event_body(mention("hello")))
    [post] = await answered(fake)
    assert post.params["text"].strip()
    assert len(fake.calls_to("reactions.remove", ok_only=False)) == 0  # nothing added, nothing to remove


# -- the Messages tab: a greeting once, and prompts other than the manifest's ----------------


async def test_messages_tab_greets_once_and_leaves_the_manifests_prompts_to_slack(start_bot, fake):
    bot = await start_bot()  # SLACK_SUGGESTED_PROMPTS unset: the manifest's own, which Slack shows by itself
    for _ in range(3):
        assert (await bot.send(event_body(home_opened("messages"))))[0] == 200
    await bot.send(event_body(home_opened("messages", user="U3", channel="D3")))  # someone else
    await wait_for(lambda: len(fake.posts) == 2, what="the second person's greeting")
    await asyncio.sleep(0.3)  # a third greeting would have been posted by now
    assert [(p.params["channel"], p.params.get("thread_ts"), p.params["text"]) for p in fake.posts] == [
        ("D1", None, GREETING), ("D3", None, GREETING)]
    assert fake.calls_to("assistant.threads.setSuggestedPrompts", ok_only=False) == []
    assert bot.model.inputs == []  # a greeting is no exchange: not stored, no model call
    assert await bot.engine.history("slack:T1:D1") == []


async def test_messages_tab_sets_other_prompts_the_agent_way(start_bot, fake):
    prompts = ("How are you?", "Tell me a joke")
    bot = await start_bot(slack_suggested_prompts=prompts)
    for _ in range(2):
        assert (await bot.send(event_body(home_opened("messages"))))[0] == 200
    calls = await wait_for(lambda: fake.calls_to("assistant.threads.setSuggestedPrompts")[1:] and
                           fake.calls_to("assistant.threads.setSuggestedPrompts"), what="the prompts")
    # No thread_ts: with it an agent app's call silently fails (the fake, like Slack, then shows nothing).
    assert all("thread_ts" not in call.params for call in calls)
    assert fake.suggested == {("D1", None): {"title": PROMPTS_TITLE,
                                             "prompts": [{"title": p, "message": p} for p in prompts]}}
    await wait_for(lambda: fake.posts, what="the greeting")
    await asyncio.sleep(0.3)
    assert [p.params["text"] for p in fake.posts] == [GREETING]


async def test_no_greeting_for_someone_who_already_talked_with_the_bot(start_bot, fake):
    bot = await start_bot(slack_suggested_prompts=("How are you?",))
    await bot.send(event_body(dm("hello")))
    await answered(fake)
    await bot.send(event_body(home_opened("messages")))
    await wait_for(lambda: fake.suggested, what="the prompts")
    assert [p["title"] for p in fake.suggested[("D1", None)]["prompts"]] == ["How are you?"]
    await asyncio.sleep(0.3)
    assert len(fake.posts) == 1  # only the answer


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


# -- apps still on the legacy assistant experience (assistant_view) ---------------------------


async def test_legacy_assistant_thread_gets_prompts_greeting_and_answers_in_the_thread(start_bot, fake):
    fake.experience = "assistant"  # an app created before agent_view, its manifest unchanged
    bot = await start_bot(socket_mode=True)
    event = thread_started(channel="D5")
    envelope = await fake.send_envelope(event_body(event))
    await wait_for(lambda: fake.acked(envelope), what="the ack")
    [greeting] = await wait_for(lambda: fake.posts, what="the greeting")
    thread = event["assistant_thread"]["thread_ts"]
    assert (greeting.params["channel"], greeting.params["thread_ts"], greeting.params["text"]) == ("D5", thread,
                                                                                                   GREETING)
    # The legacy way: the prompts on the assistant thread (its manifest had none of its own).
    assert fake.suggested == {("D5", thread): {"title": PROMPTS_TITLE, "prompts": [
        {"title": p, "message": p} for p in DEFAULT_SLACK_PROMPTS]}}
    again = await fake.send_envelope(event_body(thread_started(channel="D5")))
    await wait_for(lambda: fake.acked(again) and len(fake.suggested) == 2, what="the second thread's prompts")
    await asyncio.sleep(0.3)
    assert len(fake.posts) == 1  # greeted once
    assert bot.model.inputs == []

    # The user writes in the assistant thread: answered there, with the status on it.
    asked = await fake.send_envelope(event_body(dm("hello assistant", channel="D5", thread_ts=thread)))
    await wait_for(lambda: fake.acked(asked), what="the message's ack")
    posts = await answered(fake, 2)
    assert (posts[1].params["channel"], posts[1].params["thread_ts"]) == ("D5", thread)
    assert [(c.params["thread_ts"], c.params["status"]) for c in fake.status_calls("D5")] == [
        (thread, STATUS), (thread, "")]


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
    assert [b["type"] for b in blocks] == ["section", "context_actions", "actions"]  # the last: Try again
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
    # In the thread of the answer clicked, where the DM's answer went.
    assert note.params["text"] == THANKS["good"] and note.params["thread_ts"] == post.params["thread_ts"]
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
