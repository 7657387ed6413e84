"""The platform fakes themselves: what tests of restarts rely on them to do as Discord and Slack do
(nonces, answers withheld after the work is done, history reads and their scopes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fake_discord import CHANNEL_ID, OTHER_CHANNEL_ID, FakeDiscord
from fake_slack import BOT_ID, BOT_USER_ID, FakeSlack, new_ts, wait_for
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

MESSAGES = f"/channels/{CHANNEL_ID}/messages"
METADATA = {"event_type": "reply_part", "event_payload": {"answers": "ex1", "part": 0}}


# -- Discord ---------------------------------------------------------------


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Gateway:
    """An identified gateway connection that keeps every dispatch it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            payload = json.loads(frame.data)
            if payload["op"] == 0:
                self.events.append((payload["t"], payload["d"]))

    def created(self) -> list[str]:
        """Ids of the messages MESSAGE_CREATE announced, in order."""
        return [data["id"] for event, data in self.events if event == "MESSAGE_CREATE"]


@pytest.fixture
async def gateway(discord: FakeDiscord, session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    ws = await session.ws_connect(discord.gateway_url)
    await ws.receive_json()  # hello
    properties = {"os": "linux", "browser": "test_fakes", "device": "test_fakes"}
    await ws.send_json({"op": 2, "d": {"token": discord.token, "intents": 0, "properties": properties}})
    gateway = Gateway(ws)
    await discord.wait_for(lambda: discord._sockets and discord._sockets[0].live, what="the gateway identified")
    yield gateway
    await ws.close()


async def send(
    session: aiohttp.ClientSession, fake: FakeDiscord, content: str, *, channel_id: int = CHANNEL_ID, **extra: Any
) -> tuple[int, Any]:
    """POST a message the way discord.py does (`nonce=` adds the nonce as a string and enforce_nonce)."""
    headers = {"Authorization": f"Bot {fake.token}"}
    body = {"content": content, **extra}
    url = f"{fake.api_url}/channels/{channel_id}/messages"
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_repeated_nonce_answers_the_first_message_and_creates_none(discord, session, gateway):
    status, first = await send(session, discord, "hello", nonce="ex1000", enforce_nonce=True)
    assert status == 200 and first["nonce"] == "ex1000"
    status, again = await send(session, discord, "hello, again", nonce="ex1000", enforce_nonce=True)
    assert status == 200 and again["id"] == first["id"] and again["content"] == "hello"
    assert [c.deduplicated for c in discord.calls] == [False, True]
    assert discord.reply_ids() == [int(first["id"])] and len(discord.messages) == 1
    # Dispatches go out in order: once the next message is announced, a second echo of the first would be in.
    _, other = await send(session, discord, "something else", nonce="ex2000", enforce_nonce=True)
    await discord.wait_for(lambda: other["id"] in gateway.created(), what="the echo")
    assert gateway.created() == [first["id"], other["id"]]
    assert gateway.events[-1][1]["nonce"] == "ex2000"  # the echo carries the nonce too
    # A message fetched later has no nonce.
    headers = {"Authorization": f"Bot {discord.token}"}
    async with session.get(f"{discord.api_url}{MESSAGES}/{first['id']}", headers=headers) as response:
        assert "nonce" not in await response.json()


async def test_a_nonce_is_enforced_only_when_asked_and_only_for_a_while(discord, session):
    _, first = await send(session, discord, "one", nonce="n1")
    _, second = await send(session, discord, "two", nonce="n1")  # no enforce_nonce: just echoed back
    assert second["id"] != first["id"] and second["nonce"] == "n1"
    discord.nonce_window = 0  # the few minutes have passed
    _, third = await send(session, discord, "three", nonce="n1", enforce_nonce=True)
    assert third["id"] not in (first["id"], second["id"])
    assert len(discord.created()) == 3
    status, error = await send(session, discord, "four", nonce="x" * 26, enforce_nonce=True)
    assert status == 400 and error["code"] == 50035 and "nonce" in error["errors"] and len(discord.created()) == 3
    # Discord takes at most 25 characters: its contract names the field, and this test meant it.
    assert [(v.operation, v.field) for v in discord.contract.take()] == [("create_message", "nonce")]


async def test_a_held_response_is_created_and_dispatched_but_unanswered_until_released(discord, session, gateway):
    discord.hold_response("POST", MESSAGES)
    held = asyncio.get_running_loop().create_task(send(session, discord, "hello", nonce="h1", enforce_nonce=True))
    await discord.wait_for(lambda: discord.withheld, what="the answer withheld")
    await discord.wait_for(gateway.created, what="the echo")
    assert len(discord.created()) == 1 and gateway.created() == [str(discord.reply_ids()[0])]
    done, _ = await asyncio.wait([held], timeout=0.3)
    assert not done
    assert (await send(session, discord, "not held: the hold was for one request", nonce="h2"))[0] == 200
    assert (await send(session, discord, "elsewhere", channel_id=OTHER_CHANNEL_ID))[0] == 200
    discord.release_held()
    status, message = await asyncio.wait_for(held, 5)
    assert status == 200 and int(message["id"]) == discord.reply_ids()[0] and not discord.withheld


async def test_stopping_lets_a_held_response_go(discord, session):
    discord.hold_response("POST", MESSAGES)
    held = asyncio.get_running_loop().create_task(send(session, discord, "hello"))
    await discord.wait_for(lambda: discord.withheld, what="the answer withheld")
    await discord.stop()
    status, _ = await asyncio.wait_for(held, 5)
    assert status == 200


# -- Slack -----------------------------------------------------------------


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.close()


@pytest.fixture
def client(slack: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-fake", base_url=slack.api_url)


async def test_history_and_replies_read_back_what_was_posted(slack, client):
    parent = slack.add_message("C1", new_ts(), "<@UBOT> hi", "U2")
    reply = await client.chat_postMessage(channel="C1", thread_ts=parent["ts"], text="part 0", metadata=METADATA)
    top = await client.chat_postMessage(channel="C1", text="at the top")
    await client.chat_postMessage(channel="C2", text="another channel")

    history = await client.conversations_history(channel="C1")
    assert [m["ts"] for m in history["messages"]] == [top["ts"], parent["ts"]]  # newest first, no replies
    assert history["has_more"] is False
    shown_parent = history["messages"][1]
    assert shown_parent["thread_ts"] == parent["ts"] and shown_parent["reply_count"] == 1
    assert shown_parent["reply_users"] == [BOT_USER_ID] and shown_parent["latest_reply"] == reply["ts"]
    assert (await client.conversations_history(channel="C1", limit=1))["has_more"] is True
    after = await client.conversations_history(channel="C1", oldest=parent["ts"])
    assert [m["ts"] for m in after["messages"]] == [top["ts"]]

    replies = await client.conversations_replies(channel="C1", ts=parent["ts"])
    assert [m["ts"] for m in replies["messages"]] == [parent["ts"], reply["ts"]]  # the parent first
    bot_reply = replies["messages"][1]
    assert bot_reply["user"] == BOT_USER_ID and bot_reply["bot_id"] == BOT_ID and bot_reply["text"] == "part 0"
    assert bot_reply["parent_user_id"] == "U2" and bot_reply["thread_ts"] == parent["ts"]
    assert "metadata" not in bot_reply  # only with include_all_metadata, as Slack does
    with_metadata = await client.conversations_replies(channel="C1", ts=parent["ts"], include_all_metadata=True)
    assert with_metadata["messages"][1]["metadata"] == METADATA

    empty = (await client.conversations_history(channel="C9")).data
    assert (empty["messages"], empty["has_more"]) == ([], False)
    with pytest.raises(SlackApiError) as raised:
        await client.conversations_replies(channel="C1", ts="1.000001")
    assert raised.value.response["error"] == "thread_not_found"


async def test_metadata_posted_in_a_form_body_is_stored_decoded(slack, session):
    form = {"token": "xoxb-fake", "channel": "D1", "text": "hi", "metadata": json.dumps(METADATA)}
    async with session.post(slack.api_url + "chat.postMessage", data=form) as response:
        assert (await response.json())["ok"]
    query = {"token": "xoxb-fake", "channel": "D1", "include_all_metadata": "true"}
    async with session.get(slack.api_url + "conversations.history", params=query) as response:
        assert [m["metadata"] for m in (await response.json())["messages"]] == [METADATA]


@pytest.mark.parametrize(
    ("channel", "scope"),
    [("C1", "channels:history"), ("G1", "groups:history"), ("D1", "im:history"), ("GMPIM", "mpim:history")],
)
async def test_reading_a_conversation_needs_the_history_scope_of_its_kind(slack, client, channel, scope):
    slack.mpims.add("GMPIM")
    slack.missing_scopes = {scope}
    for read in (
        client.conversations_history(channel=channel),
        client.conversations_replies(channel=channel, ts="1.1"),
    ):
        with pytest.raises(SlackApiError) as raised:
            await read
        assert (raised.value.response["error"], raised.value.response["needed"]) == ("missing_scope", scope)
    others = [c for c in ("C1", "G1", "D1", "GMPIM") if c != channel]
    assert all([(await client.conversations_history(channel=c))["ok"] for c in others])


async def test_a_held_slack_answer_comes_only_once_released(slack, client):
    slack.hold_response("chat.postMessage")
    held = asyncio.get_running_loop().create_task(client.chat_postMessage(channel="C1", text="hello"))
    await wait_for(lambda: slack.withheld, what="the answer withheld")
    assert [m["text"] for m in slack.messages["C1"]] == ["hello"] and len(slack.posts) == 1
    done, _ = await asyncio.wait([held], timeout=0.3)
    assert not done
    assert (await client.chat_postMessage(channel="C1", text="not held"))["ok"]
    slack.release_held()
    assert (await asyncio.wait_for(held, 5))["ts"] == slack.posts[0].response_ts


async def test_a_delayed_slack_call_is_not_done_until_its_time_or_the_close(slack, client):
    slack.delay("chat.postMessage", 600)
    delayed = asyncio.get_running_loop().create_task(client.chat_postMessage(channel="C1", text="on its way"))
    await wait_for(lambda: slack.held == 1, what="the call held")
    assert (await client.chat_postMessage(channel="C1", text="not delayed"))["ok"]  # the next one is not
    assert [m["text"] for m in slack.messages["C1"]] == ["not delayed"] and len(slack.posts) == 1
    await slack.close()  # a process killed now would never have posted it; a live one gets it done
    assert (await asyncio.wait_for(delayed, 5))["ok"] and slack.held == 0
