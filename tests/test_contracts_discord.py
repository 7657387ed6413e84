"""The Discord contract checks (tests/discord_contract.py) can fail: a wrong request sent through the
real discord.py client, a wrong answer of the fake, a wrong gateway payload each get named, and a
violation fails the test during which it happened. Every other Discord test shows the passing side."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from conftest import REPO, subprocess_env
from discord.http import Route
from discord_contract import (
    BOT_SENDS,
    FAKE_SENDS,
    INTERACTION_KINDS,
    check_gateway,
    check_request,
    snowflakes_to_strings,
)
from fake_discord import CHANNEL_ID, FakeDiscord
from jsonschema import Draft7Validator

IDENTIFY_PROPERTIES = {"os": "linux", "browser": "contract-test", "device": "contract-test"}


class InventingFake(FakeDiscord):
    """A fake whose application answer carries a field Discord's document does not have."""

    def _application(self) -> dict[str, Any]:
        return {**super()._application(), "favourite_colour": "blue"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def client(fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[discord.Client]:
    """A real discord.py client logged in to `fake` (REST only: no gateway needed to send)."""
    monkeypatch.setattr(Route, "BASE", fake.api_url)  # restored after the test
    client = discord.Client(intents=discord.Intents.none())
    await client.login(fake.token)
    yield client
    await client.close()


def named(violations: list[Any]) -> list[tuple[str, str]]:
    return [(violation.operation, violation.field) for violation in violations]


async def test_a_malformed_body_sent_through_discord_py_is_refused_naming_operation_and_fields(fake, client):
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=CHANNEL_ID)
    with pytest.raises(discord.HTTPException) as refused:
        await client.http.request(route, json={"content": 5, "tts": "no", "colour": "blue"})
    # The bot sees what Discord answers a bad form body, with each field's error.
    assert refused.value.status == 400 and refused.value.code == 50035
    assert "In content" in refused.value.text and "In tts" in refused.value.text
    assert sorted(named(fake.contract.take())) == [
        ("create_message", "colour"), ("create_message", "content"), ("create_message", "tts"),
    ]  # fmt: skip
    assert not fake.created()


async def test_a_message_longer_than_discord_takes_is_named_through_channel_send(fake, client):
    channel = client.get_partial_messageable(CHANNEL_ID)
    with pytest.raises(discord.HTTPException):
        await channel.send("x" * 4001)  # the document's limit for content is 4000 characters
    [violation] = fake.contract.take()
    assert (violation.operation, violation.part, violation.field) == ("create_message", "request", "content")
    assert violation.message.endswith("is too long")
    await channel.send("short enough")  # the same path, in bounds: no violation
    assert not fake.contract.violations and len(fake.created()) == 1


async def test_integer_snowflakes_pass_but_other_wrong_types_do_not(fake, client):
    # discord.py sends message_reference's ids as integers, which Discord takes: normalised, they pass.
    reference = {"message_id": 1, "channel_id": CHANNEL_ID, "fail_if_not_exists": False}
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=CHANNEL_ID)
    await client.http.request(route, json={"content": "hi", "message_reference": reference})
    assert not fake.contract.violations
    # An integer where a list of snowflakes is expected is not an `id` field: still refused.
    with pytest.raises(discord.HTTPException):
        await client.http.request(route, json={"content": "hi", "allowed_mentions": {"users": [5]}})
    assert named(fake.contract.take()) == [("create_message", "allowed_mentions.users.0")]


def test_only_id_fields_are_normalised():
    body = {"id": 1, "channel_id": 2, "flags": 3, "nested": [{"message_id": 4, "count": 5}], "users": [6], "ok": True}
    assert snowflakes_to_strings(body) == {
        "id": "1", "channel_id": "2", "flags": 3, "nested": [{"message_id": "4", "count": 5}], "users": [6], "ok": True,
    }  # fmt: skip


async def test_a_route_discord_does_not_have_is_named_and_answered_404(fake, client):
    with pytest.raises(discord.NotFound):
        await client.http.request(Route("GET", "/channels/{channel_id}/nothing", channel_id=CHANNEL_ID))
    [violation] = fake.contract.take()
    assert violation.operation == f"GET /channels/{CHANNEL_ID}/nothing" and "no such operation" in violation.message


async def test_a_fake_answer_with_an_invented_field_is_named(monkeypatch):
    fake = InventingFake()
    await fake.start()
    try:
        monkeypatch.setattr(Route, "BASE", fake.api_url)
        client = discord.Client(intents=discord.Intents.none())
        await client.login(fake.token)
        await client.application_info()  # discord.py still reads it: only the contract notices
        await client.close()
        # (login reads the application too: each answer is named)
        assert set(named(fake.contract.take())) == {("get_my_oauth2_application", "favourite_colour")}
    finally:
        await fake.stop()


async def test_wrong_gateway_payloads_from_the_fake_and_the_client_are_named(fake):
    async with aiohttp.ClientSession() as session, session.ws_connect(fake.gateway_url) as ws:
        await ws.receive_json()  # hello
        await ws.send_json({"op": 2, "d": {"token": fake.token, "intents": 0, "properties": {"os": "linux"}}})
        await fake.wait_for(lambda: fake._sockets and fake._sockets[0].live, what="the gateway identified")
        message_id = await fake.send_message("a message")
        await fake.react(message_id, "\N{THUMBS UP SIGN}")
        assert named(fake.contract.take()) == [
            ("op 2", "d.properties.browser"), ("op 2", "d.properties.device"),
        ]  # the client's identify lacked them; the fake's own READY, GUILD_CREATE, message and reaction passed
        broken = {**fake.messages[message_id], "id": str(message_id + 1), "author": None, "colour": "blue"}
        await fake.dispatch("MESSAGE_CREATE", broken)
        found = {violation.field: violation for violation in fake.contract.take()}
        assert sorted(found) == ["d.author", "d.colour"]
        assert (found["d.author"].operation, found["d.author"].part) == (
            "op 0 MESSAGE_CREATE", "gateway payload from the fake")
        assert found["d.colour"].message == "Additional properties are not allowed ('colour' was unexpected)"


def test_an_interaction_names_the_field_by_its_kind_of_command():
    payload = {"op": 0, "s": 1, "t": "INTERACTION_CREATE", "d": {"type": 2, "data": {"type": 3, "name": "Ask"}}}
    fields = {violation.field for violation in check_gateway(payload)}
    assert {"d.data.id", "d.data.target_id", "d.id", "d.token"} <= fields  # a message command lacks these


def test_a_violation_fails_the_test_that_made_it(tmp_path: Path):
    """Run a test that provokes a violation and otherwise passes: pytest reports it FAILED, naming it."""
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from discord_contract import pytest_runtest_call  # noqa: F401\n"
    )
    (tmp_path / "test_provokes.py").write_text(
        "import aiohttp\nfrom fake_discord import CHANNEL_ID, FakeDiscord\n\n"
        "async def test_sends_a_bad_body():\n"
        "    fake = FakeDiscord()\n    await fake.start()\n"
        "    try:\n"
        "        async with aiohttp.ClientSession() as session:\n"
        "            url = f'{fake.api_url}/channels/{CHANNEL_ID}/messages'\n"
        "            headers = {'Authorization': f'Bot {fake.token}'}\n"
        "            async with session.post(url, json={'content': 5}, headers=headers) as response:\n"
        "                assert response.status == 400\n"
        "    finally:\n        await fake.stop()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=tmp_path,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1 and "1 failed" in out and "error" not in out.splitlines()[-1], out
    assert "FAILED test_provokes.py::test_sends_a_bad_body" in out
    assert "create_message request: content: 5 is not of type 'string', 'null'" in out


def test_every_gateway_schema_is_a_valid_schema_with_its_source_recorded():
    folder = REPO / "tests" / "contracts" / "discord"
    schemas = sorted((folder / "gateway").glob("*.json"))
    assert {path.stem for path in schemas} == set(FAKE_SENDS.values()) | set(BOT_SENDS.values()) | set(
        INTERACTION_KINDS.values())  # fmt: skip
    for path in schemas:
        Draft7Validator.check_schema(json.loads(path.read_text()))
        assert path.stem in (folder / "refresh.sh").read_text()  # generated by the refresh script


def test_an_erratum_forgives_only_its_own_field():
    # discord.py puts `tts` in a message edit, which Edit Message does not take (ERRATA): only that is forgiven.
    headers = {"Authorization": "Bot token"}
    body = {"content": "edited", "tts": False, "colour": "blue"}
    found = check_request("PATCH", f"/channels/{CHANNEL_ID}/messages/1", query={}, headers=headers, body=body)
    assert named(found) == [("update_message", "colour")]
