"""The Slack contract checks (tests/slack_contract.py, tests/contracts/slack/) can fail:
each deliberately wrong call goes through the real slack_sdk client (and Bolt's
helpers the bot uses) to the fake Slack, which names the method and the argument;
a wrong answer of the fake and a payload unlike Slack's samples are named too."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from fake_slack import FakeSlack, block_actions, dm, event_body, home_opened, mention, thread_started
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_bolt.context.set_suggested_prompts.async_set_suggested_prompts import AsyncSetSuggestedPrompts
from slack_contract import CONTRACTS, check_event, manifest_experience, methods, shape_problems
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.close()  # fails on any violation a test left behind


@pytest.fixture
def client(slack: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-fake", base_url=slack.api_url)


async def refused(slack: FakeSlack, call, error: str = "invalid_arguments") -> list[str]:
    """Make a call the contract refuses: Slack's `error` comes back, and the violations it
    recorded (taken, so the fixture's close() does not fail)."""
    with pytest.raises(SlackApiError) as raised:
        await call
    assert raised.value.response["error"] == error
    found = slack.take_violations()
    assert raised.value.response["response_metadata"]["messages"] == found
    return found


# -- arguments -----------------------------------------------------------------


async def test_valid_calls_break_nothing(slack, client):
    await AsyncSetStatus(client, "D1", "1700000000.000100")(status="is thinking...", loading_messages=["a"] * 10)
    await AsyncSetStatus(client, "D1", "1700000000.000100")(status="")  # an empty status clears it
    prompts = [{"title": f"t{i}", "message": f"m{i}"} for i in range(4)]
    await client.assistant_threads_setSuggestedPrompts(channel_id="D1", prompts=prompts)
    await client.chat_postMessage(channel="C1", text="x" * 4000)
    await client.chat_postMessage(channel="C1", blocks=[{"type": "divider"}] * 50)
    assert slack.violations == []


async def test_set_status_without_thread_ts_is_named(slack, client):
    # The bot's own path: Bolt's set_status helper, made for a message with no thread.
    found = await refused(slack, AsyncSetStatus(client, "D1", None)(status="is thinking..."))
    assert found == ["assistant.threads.setStatus: required argument `thread_ts` is missing "
                     "(https://docs.slack.dev/reference/methods/assistant.threads.setStatus)"]


async def test_eleven_loading_messages_are_named(slack, client):
    found = await refused(slack, AsyncSetStatus(client, "D1", "1.000001")(status="hm", loading_messages=["a"] * 11))
    assert len(found) == 1
    assert "assistant.threads.setStatus: argument `loading_messages` has 11 items, over the limit of 10" in found[0]


async def test_five_suggested_prompts_and_a_prompt_without_message_are_named(slack, client):
    prompts = [{"title": f"t{i}", "message": f"m{i}"} for i in range(5)]
    found = await refused(slack, AsyncSetSuggestedPrompts(client, "D1", None)(prompts=prompts))
    assert len(found) == 1
    assert "assistant.threads.setSuggestedPrompts: argument `prompts` has 5 items, over the limit of 4" in found[0]
    found = await refused(slack, client.assistant_threads_setSuggestedPrompts(
        channel_id="D1", prompts=[{"title": "no message"}]))
    assert found == ["assistant.threads.setSuggestedPrompts: argument `prompts`[0] has no `message` "
                     "(https://docs.slack.dev/reference/methods/assistant.threads.setSuggestedPrompts)"]


async def test_a_message_over_the_text_and_block_limits_is_named(slack, client):
    found = await refused(slack, client.chat_postMessage(channel="C1", text="x" * 4001))
    assert found == ["chat.postMessage: argument `text` is 4001 characters, over the limit of 4000 "
                     "(https://docs.slack.dev/reference/methods/chat.postMessage)"]
    found = await refused(slack, client.chat_postMessage(channel="C1", blocks=[{"type": "divider"}] * 51),
                          "invalid_blocks")
    assert "chat.postMessage: argument `blocks` has 51 items, over the limit of 50" in found[0]
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "y" * 3001}}
    found = await refused(slack, client.chat_postMessage(channel="C1", text="fallback", blocks=[section]),
                          "invalid_blocks")
    assert found == ["chat.postMessage: argument `blocks`[0] (section).text is 3001 characters, over the limit of "
                     "3000 (https://docs.slack.dev/reference/block-kit/blocks/section-block)"]
    found = await refused(slack, client.chat_postMessage(channel="C1"))
    assert "chat.postMessage: one of `text`, `blocks`, `attachments` is required" in found[0]


async def test_feedback_buttons_and_a_home_tab_over_their_limits_are_named(slack, client):
    buttons = {"type": "feedback_buttons", "action_id": "f",
               "positive_button": {"text": {"type": "plain_text", "text": "g" * 76}, "value": "good"},
               "negative_button": {"text": {"type": "plain_text", "text": "bad"}}}
    found = await refused(slack, client.chat_postMessage(
        channel="C1", text="t", blocks=[{"type": "context_actions", "elements": [buttons]}]), "invalid_blocks")
    assert any("(feedback_buttons).positive_button.text is 76 characters, over the limit of 75" in f for f in found)
    assert any("(feedback_buttons).negative_button.value is missing" in f for f in found)
    view = {"type": "home", "blocks": [{"type": "divider"}] * 101}
    found = await refused(slack, client.views_publish(user_id="U2", view=view))
    assert "views.publish: argument `view`.blocks has 101 blocks, over the limit of 100" in found[0]
    found = await refused(slack, client.views_publish(user_id="", view={"type": "home", "blocks": []}))
    assert found[0].startswith("views.publish: required argument `user_id` is missing")


async def test_missing_arguments_of_the_other_methods_are_named(slack, client):
    found = await refused(slack, client.reactions_add(channel="C1", timestamp="1.000001", name=""))
    assert found[0].startswith("reactions.add: required argument `name` is missing")
    found = await refused(slack, client.conversations_replies(channel="C1", ts=""))
    assert found[0].startswith("conversations.replies: required argument `ts` is missing")
    found = await refused(slack, client.conversations_history(channel="C1", limit=1000))
    assert found[0].startswith("conversations.history: argument `limit` is 1000, over the maximum of 999")
    found = await refused(slack, client.chat_postEphemeral(channel="C1", user="", text="hi"))
    assert found[0].startswith("chat.postEphemeral: required argument `user` is missing")
    found = await refused(slack, client.api_call("chat.unknownMethod"))
    assert found == ["chat.unknownMethod: not in tests/contracts/slack/methods.json; add its reference page's "
                     "arguments"]


async def test_a_violation_fails_the_test_at_close():
    fake = await FakeSlack().start()
    client = AsyncWebClient(token="xoxb-fake", base_url=fake.api_url)
    with pytest.raises(SlackApiError):
        await client.assistant_threads_setStatus(channel_id="D1", thread_ts=None, status="x")
    with pytest.raises(AssertionError, match=r"assistant\.threads\.setStatus: required argument `thread_ts`"):
        await fake.close()


# -- the fake's answers --------------------------------------------------------


async def test_a_wrong_answer_of_the_fake_is_named(slack, client, monkeypatch):
    real = slack._answer

    def wrong(method, params, token):
        answer = real(method, params, token)
        if method == "users.info":
            answer["user"].pop("profile")
            answer["user"]["nickname"] = "made up"
        if method == "assistant.threads.setStatus":
            answer["status_set"] = True
        return answer

    monkeypatch.setattr(slack, "_answer", wrong)
    await client.users_info(user="U2")
    await client.assistant_threads_setStatus(channel_id="D1", thread_ts="1.000001", status="x")
    found = slack.take_violations()
    assert "users.info response: user: 'profile' is a required property (OpenAPI /users.info)" in found
    assert ("users.info response: user: field `nickname` is in neither the OpenAPI schema nor java-slack-sdk's "
            "sample") in found
    assert ("assistant.threads.setStatus response: status_set: field not in the sample (java-slack-sdk "
            "java-slack-sdk-samples/api/assistant.threads.setStatus.json)") in found


async def test_the_fakes_own_answers_validate(slack, client):
    parent = slack.add_message("C1", "1700000000.000001", "<@UBOT> hi", "U2")
    await client.chat_postMessage(channel="C1", thread_ts=parent["ts"], text="re", metadata={
        "event_type": "blenderchat_reply", "event_payload": {"answers": "x", "part": 0}})
    await client.conversations_replies(channel="C1", ts=parent["ts"], include_all_metadata=True)
    await client.conversations_history(channel="C1", include_all_metadata=True)
    await client.conversations_history(channel="C9")
    await client.users_info(user="U2")
    await client.auth_test()
    await client.reactions_add(channel="C1", timestamp=parent["ts"], name="eyes")
    await client.views_publish(user_id="U2", view={"type": "home", "blocks": []})
    await client.chat_postEphemeral(channel="C1", user="U2", text="only you")
    assert slack.violations == []


# -- events --------------------------------------------------------------------


def test_the_event_helpers_build_payloads_of_slacks_shape():
    events = (mention("hi"), mention("in a thread", thread_ts="1700000000.000001"), dm("hi"),
              dm("file", subtype="file_share", files=[{"id": "F1", "name": "a.png"}]),
              home_opened("messages"), home_opened("home"), thread_started())  # fmt: skip
    for event in events:
        assert check_event(event_body(event)) == [], event
    message = {"type": "message", "user": "UBOT", "bot_id": "BBOT", "text": "hi", "ts": "1700000000.000002",
               "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]}
    click = {"type": "feedback_buttons", "action_id": "reply_feedback", "block_id": "b1", "value": "good|x|y",
             "text": {"type": "plain_text", "text": "Good reply"}}
    assert check_event(block_actions(click, message=message, channel="D1")) == []
    assert check_event(block_actions({"type": "button", "action_id": "forget", "value": "v"},
                                     view={"type": "home", "blocks": []})) == []  # fmt: skip


def test_an_event_unlike_slacks_samples_is_named():
    with pytest.raises(AssertionError, match=r"event app_mention: event/mood: field not in the sample"):
        event_body({**mention("hi"), "mood": "happy"})
    with pytest.raises(AssertionError, match=r"event message: event/text: is a number, the sample has a string"):
        event_body({**dm("hi"), "text": 5})
    with pytest.raises(AssertionError, match=r"payload block_actions: actions\[0\]/value: is a number"):
        block_actions({"type": "button", "action_id": "a", "value": 7})
    body = event_body({**dm("hi"), "mood": 1}, check=False)  # malformed on purpose: allowed, and still seen
    assert check_event(body) == ["event message: event/mood: field not in the sample "
                                 "(java-slack-sdk-samples/events/MessagePayload.json)"]


def test_shapes_compare_types_and_fields():
    assert shape_problems({"a": [{"b": 1}]}, {"a": [{"b": 123}]}) == []
    assert shape_problems({"a": [{"b": "1"}]}, {"a": [{"b": 123}]}) == ["a[0]/b: is a string, the sample has a number"]
    assert shape_problems({"a": None}, {"a": {"b": ""}}) == []  # null: a sample cannot say what may be null
    assert shape_problems({"free": {"x": 1}}, {"free": {}}) == []  # an empty sample object: any content


# -- the table -------------------------------------------------------------------


def test_every_method_cites_its_reference_page_and_every_source_is_vendored():
    table = methods()["methods"]
    for name, spec in table.items():
        assert spec["reference"] == f"https://docs.slack.dev/reference/methods/{name}", name
        source = spec["response"]
        assert "openapi" in source or "sample" in source, name
        if "sample" in source:
            assert (CONTRACTS / source["sample"]).is_file(), source
    for block, rule in methods()["blocks"].items():
        if block != "about":
            assert rule["reference"].startswith("https://docs.slack.dev/reference/block-kit/"), block
    openapi = json.loads((CONTRACTS / "slack_web_openapi_v2_without_examples.json").read_text())
    for name, spec in table.items():
        if "openapi" in spec["response"]:
            assert spec["response"]["openapi"] in openapi["paths"], name


async def test_suggested_prompts_with_thread_ts_are_named_for_an_agent_app_only(client, slack):
    prompts = [{"title": "Hi", "message": "Say hi"}]
    slack.experience = "assistant"  # the legacy assistant_view: thread_ts is how prompts reach a thread
    await client.assistant_threads_setSuggestedPrompts(channel_id="D1", thread_ts="1.000001", prompts=prompts)
    assert slack.violations == []
    slack.experience = "agent"
    await client.assistant_threads_setSuggestedPrompts(channel_id="D1", prompts=prompts)  # the agent way
    assert slack.violations == []
    # Slack answers ok and shows nothing: only the check tells.
    assert (await client.assistant_threads_setSuggestedPrompts(channel_id="D1", thread_ts="1.000001",
                                                               prompts=prompts))["ok"]  # fmt: skip
    assert slack.take_violations() == [
        "assistant.threads.setSuggestedPrompts: argument `thread_ts` must be left out by an agent_view app: the "
        "call silently fails (https://docs.slack.dev/reference/methods/assistant.threads.setSuggestedPrompts)"]


def test_the_fake_takes_the_experience_slack_manifest_yml_declares(tmp_path):
    manifest = tmp_path / "manifest.yml"
    manifest.write_text("features:\n  agent_view:\n    agent_description: hi\n")
    assert manifest_experience(manifest) == "agent"
    manifest.write_text("features:\n  assistant_view:\n    assistant_description: hi\n")
    assert manifest_experience(manifest) == "assistant"
    assert FakeSlack().experience == manifest_experience()
