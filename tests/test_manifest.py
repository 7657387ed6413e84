"""slack-manifest.yml against Slack's own manifest JSON Schema (vendored in tests/contracts/slack/)
and against the bot: Slack's agent messaging experience (`agent_view`), the bot's default prompts as
the manifest's, exactly the events and scopes the bot uses, each event taken by a listener."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

import yaml
from conftest import REPO
from fake_slack import dm, event_body, home_opened, mention, signed_headers, thread_started, wait_for
from jsonschema import Draft7Validator
from test_slack import SECRET, answered, fake, start_bot  # noqa: F401 (fixtures)

from adapters.slack_commands import COMMAND as SETTINGS_COMMAND
from adapters.slack_surface import MANIFEST_PROMPTS

FORM = "application/x-www-form-urlencoded"  # how Slack POSTs a slash command
MANIFEST = REPO / "slack-manifest.yml"
SCHEMA = REPO / "tests" / "contracts" / "slack" / "manifest.schema.1.0.0.json"


def manifest(text: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text() if text is None else text)


def violations(document: dict[str, Any]) -> list[str]:
    """Every place `document` breaks Slack's manifest schema, as `path: message`."""
    validator = Draft7Validator(json.loads(SCHEMA.read_text()), format_checker=Draft7Validator.FORMAT_CHECKER)
    return sorted(f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
                  for error in validator.iter_errors(document))


def test_the_vendored_schema_is_a_valid_draft_7_schema():
    Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))


def test_manifest_validates_against_slacks_schema():
    assert violations(manifest()) == []


def test_the_variants_the_comments_describe_validate_too():
    """HTTP mode (both request URLs, the command's URL) and SLACK_THREAD_FOLLOWUPS=on or listening
    channels (the follow-up scopes and events), uncommented as the file says."""
    text = MANIFEST.read_text().replace("socket_mode_enabled: true", "socket_mode_enabled: false")
    text = re.sub(r"^(\s*)# (request_url: |url: )", r"\1\2", text, flags=re.MULTILINE)
    text = re.sub(r"^(\s*)# (- \S+ # follow-ups)", r"\1\2", text, flags=re.MULTILINE)
    variant = manifest(text)
    settings = variant["settings"]
    assert settings["event_subscriptions"]["request_url"] == settings["interactivity"]["request_url"]
    assert [c["url"] for c in variant["features"]["slash_commands"]] == [settings["interactivity"]["request_url"]]
    assert {"message.channels", "message.groups"} <= set(settings["event_subscriptions"]["bot_events"])
    assert {"channels:history", "groups:history"} <= set(variant["oauth_config"]["scopes"]["bot"])
    assert violations(variant) == []


def test_the_schema_check_names_what_is_wrong():
    """The check can fail: Slack's limits on agent_view, and the legacy key's own shape."""
    broken = manifest()
    broken["features"]["agent_view"]["agent_description"] = "x" * 301
    broken["features"]["agent_view"]["suggested_prompts"] *= 2  # 8 prompts
    broken["features"]["agent_view"]["suggested_prompts"][0] = {"title": "no message"}
    broken["features"]["assistant_view"] = {"suggested_prompts": []}  # no assistant_description
    found = violations(broken)
    assert any(v.startswith("features/agent_view/agent_description: ") and "too long" in v for v in found)
    assert any(v.startswith("features/agent_view/suggested_prompts: ") and "too long" in v for v in found)
    assert "features/agent_view/suggested_prompts/0: 'message' is a required property" in found
    assert "features/assistant_view: 'assistant_description' is a required property" in found


def test_manifest_uses_the_agent_experience_with_the_bots_default_prompts():
    features = manifest()["features"]
    assert "agent_view" in features and "assistant_view" not in features  # new apps can only use agent_view
    assert features["app_home"]["messages_tab_enabled"] is True  # the agent's DM
    assert features["app_home"]["messages_tab_read_only_enabled"] is False
    agent = features["agent_view"]
    assert 0 < len(agent["agent_description"]) <= 300
    # Slack shows these by itself: the bot sets prompts only when SLACK_SUGGESTED_PROMPTS differs from them.
    assert [(p["title"], p["message"]) for p in agent["suggested_prompts"]] == [(p, p) for p in MANIFEST_PROMPTS]


def test_manifest_asks_for_exactly_the_scopes_and_events_the_bot_uses():
    document = manifest()
    assert sorted(document["oauth_config"]["scopes"]["bot"]) == [
        "app_mentions:read",  # mentions
        "assistant:write",  # the agent experience; prompts other than the manifest's
        "chat:write",  # answers, the greeting, the thinking status, the feedback note
        "commands",  # /blenderbot
        "im:history",  # DMs
        "reactions:write",  # the hourglass where an answer has no thread
        "users:read",  # mentioned people's names
    ]
    # The agent experience: no assistant_thread_started (the Messages tab's app_home_opened replaces it).
    assert sorted(document["settings"]["event_subscriptions"]["bot_events"]) == [
        "app_home_opened", "app_mention", "message.im"]
    assert document["settings"]["interactivity"]["is_enabled"] and document["features"]["app_home"]["home_tab_enabled"]


async def test_every_subscribed_event_reaches_a_listener_and_the_legacy_one_too(start_bot, fake):
    bot = await start_bot(slack_suggested_prompts=())
    samples = {"app_home_opened": home_opened("messages"), "app_mention": mention("hi"), "message.im": dm("hi")}
    events = manifest()["settings"]["event_subscriptions"]["bot_events"]
    assert sorted(events) == sorted(samples)
    for name in events:
        # Bolt answers 404 to an event no listener takes; Slack then counts a failure and retries.
        assert (await bot.send(event_body(samples[name])))[0] == 200, name
    # An app created earlier with assistant_view still gets assistant_thread_started: still served.
    assert (await bot.send(event_body(thread_started())))[0] == 200
    unsubscribed = {"type": "reaction_added", "user": "U2", "reaction": "+1", "event_ts": "1.2",
                    "item": {"type": "message", "channel": "C1", "ts": "1.1"}}
    assert (await bot.send(event_body(unsubscribed)))[0] == 404
    await answered(fake, 2)


async def test_the_manifests_command_is_the_one_the_bot_takes(start_bot, fake):
    """/blenderbot as the manifest declares it reaches a listener (Bolt answers 404 to a command nobody takes)."""
    bot = await start_bot()
    [command] = manifest()["features"]["slash_commands"]
    assert command["command"] == SETTINGS_COMMAND
    body = urlencode(fake.slash_command(command["command"], "show"))
    status, _ = await bot.send(body, headers=signed_headers(SECRET, body, content_type=FORM))
    assert status == 200
    await wait_for(lambda: fake.responses, what="the answer")
    other = urlencode(fake.slash_command("/weather", "94070"))
    assert (await bot.send(other, headers=signed_headers(SECRET, other, content_type=FORM)))[0] == 404
