"""A persona for a web conversation (`PUT /api/settings`, the real aiohttp server over HTTP, the
memory in a real SQLite file) and for a terminal conversation (`/persona` in `blender-chat chat`,
a real subprocess)."""

from __future__ import annotations

import asyncio
import json

from model_doubles import GatedModel
from test_chat_cli import bot_lines, chat
from test_web import serve  # noqa: F401 (fixture)

from bot.memory import ChannelSettings, open_store

JSON = {"Content-Type": "application/json"}


async def put_settings(client, body: dict | str, **headers):
    raw = body if isinstance(body, str) else json.dumps(body)
    return await client.put("/api/settings", data=raw, headers={**JSON, **headers})


async def test_a_web_conversation_gets_its_own_persona_and_loses_it_when_forgotten(serve, tiny_model, tmp_path):
    model = GatedModel(tiny_model)
    client = await serve(model=model, memory_url=f"sqlite:///{tmp_path}/memory.db", persona=("I am a robot",))
    response = await put_settings(client, {"conversation": "abc", "persona": "I love hiking | I have a dog"})
    assert response.status == 200
    assert await response.json() == {"persona": ["I love hiking", "I have a dog"], "default_persona": ["I am a robot"]}
    for conversation in ("abc", "other"):
        chat_response = await client.post("/api/chat", json={"conversation": conversation, "text": "who are you?"})
        assert chat_response.status == 200
    assert model.personas == [[("I love hiking", "I have a dog")], [("I am a robot",)]]
    shown = await client.get("/api/settings", params={"conversation": "abc"})
    assert (await shown.json())["persona"] == ["I love hiking", "I have a dog"]

    # null: the default again.
    assert (await (await put_settings(client, {"conversation": "abc", "persona": None})).json())["persona"] is None
    await put_settings(client, {"conversation": "abc", "persona": "I am a pirate"})
    # Forgetting the conversation (the web chat's reset) forgets its persona: one person's data, like a DM.
    assert (await client.post("/api/reset", json={"conversation": "abc"})).status == 200
    shown = await client.get("/api/settings", params={"conversation": "abc"})
    assert (await shown.json())["persona"] is None


async def test_a_refused_persona_is_422_with_the_reason_and_bad_requests_400(serve, make_settings, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("zorblax\n", encoding="utf-8")
    client = await serve(safety_blocklist=blocklist)
    unsafe = await put_settings(client, {"conversation": "abc", "persona": "I am a zorblax"})
    assert unsafe.status == 422 and "safety filter" in (await unsafe.json())["error"]
    long = await put_settings(client, {"conversation": "abc", "persona": "|".join(["i like to read books."] * 25)})
    assert long.status == 422 and "may be at most" in (await long.json())["error"]
    for body in ('{"conversation": "abc"}', '{"persona": "I am a cat"}', '{"conversation": "abc", "persona": 7}',
                 '{"conversation": "abc", "persona": "x", "listen": true}', "{not json"):
        response = await put_settings(client, body)
        assert response.status == 400, body
        assert (await response.json())["code"] == "bad_request"
    wrong_type = await client.put("/api/settings", data=json.dumps({"conversation": "abc", "persona": "I am a cat"}),
                                  headers={"Content-Type": "text/plain"})
    assert wrong_type.status == 415
    shown = await client.get("/api/settings", params={"conversation": "abc"})
    assert (await shown.json())["persona"] is None  # nothing was stored


async def test_settings_need_the_token_like_the_rest_of_the_api(serve):
    client = await serve(web_api_token="s3cret")
    body = {"conversation": "abc", "persona": "I am a cat"}
    assert (await put_settings(client, body)).status == 401
    assert (await client.get("/api/settings", params={"conversation": "abc"})).status == 401
    assert (await put_settings(client, body, Authorization="Bearer s3cret")).status == 200


def test_persona_in_the_terminal_is_set_shown_reset_and_kept_for_the_conversation(tmp_path, blenderbot_dir):
    result = chat(tmp_path, blenderbot_dir,
                  "/persona I love hiking | I have a dog\n/persona\nhello\n/quit\n", "--conversation", "mine")
    assert result.returncode == 0, result.stderr
    lines = bot_lines(result.stdout)
    assert lines[0] == "(Done: my persona here is now: I love hiking | I have a dog)"
    assert lines[1] == "(This conversation's settings:"
    assert "Persona: its own: I love hiking | I have a dog" in result.stdout and "Listening" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert persona_of(tmp_path, "mine") == ("I love hiking", "I have a dog")

    refused = chat(tmp_path, blenderbot_dir, "/persona " + "|".join(["i like to read books."] * 25) + "\n/quit\n",
                   "--conversation", "mine")
    assert "may be at most" in refused.stdout
    assert persona_of(tmp_path, "mine") == ("I love hiking", "I have a dog")  # unchanged

    off = chat(tmp_path, blenderbot_dir, "/persona off\n/quit\n", "--conversation", "mine")
    assert "bot> (Done: the default settings apply here again" in off.stdout
    assert persona_of(tmp_path, "mine") == ()
    chat(tmp_path, blenderbot_dir, "/persona I am a cat\n/reset\n/quit\n", "--conversation", "mine")
    assert persona_of(tmp_path, "mine") == ()  # /reset forgets the conversation and its persona


def persona_of(tmp_path, conversation: str) -> tuple[str, ...]:
    async def read() -> ChannelSettings:
        store = open_store(f"sqlite:///{tmp_path}/memory.db", max_turns=20)
        await store.open()
        try:
            return ChannelSettings.from_values(await store.channel_settings(conversation))
        finally:
            await store.close()

    return asyncio.run(read()).persona
