"""Channel settings in every memory backend (the real SQLite file, the real Redis on a key prefix
of each test): kept per channel, shared by two engines on one Redis (two replicas), surviving a
reopen, left alone by a conversation's reset and the idle sweep, deleted with a DM's forgetting;
the engine's persona per channel, the silence of an overheard message over the channel's rate
limit, and settings that cannot be read or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_doubles import GatedModel
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from test_memory import BACKENDS, store_url

from bot.engine import ReplyEngine
from bot.errors import RateLimited
from bot.memory import ChannelSettings, StoreUnavailable, open_store
from bot.memory.inprocess import InProcessStore
from bot.ratelimit import TokenBucketLimiter


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    """A memory URL of each backend; Redis on a key prefix of this test, deleted afterwards."""
    prefix = unique_prefix()
    redis = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    request.addfinalizer(lambda: delete_prefix(redis, prefix) if redis else None)
    return store_url(request.param, tmp_path, redis, prefix)


async def test_settings_are_kept_per_channel_and_survive_a_reset_and_a_reopen(url):
    store = open_store(url, max_turns=3)
    await store.open()
    try:
        assert await store.channel_settings("discord:1") == {}
        await store.set_channel_setting("discord:1", "persona", "I love hiking\nI have a dog")
        await store.set_channel_setting("discord:1", "listen", "on")
        await store.set_channel_setting("discord:1", "listen", "off")  # replaced, not added
        await store.set_channel_setting("slack:T1:C1", "listen", "on")
        await store.append_exchange("discord:1", "hi", " hello")
        assert await store.reset("discord:1")  # the conversation, not the channel's settings
        assert await store.sweep(0) >= 0
    finally:
        await store.close()
    # memory:// lives as long as its store object: the same one; the others from the file or Redis.
    reopened = store if url == "memory://" else open_store(url, max_turns=3)
    await reopened.open()
    try:
        settings = ChannelSettings.from_values(await reopened.channel_settings("discord:1"))
        assert settings == ChannelSettings(persona=("I love hiking", "I have a dog"), listen=False)
        assert ChannelSettings.from_values(await reopened.channel_settings("slack:T1:C1")).listen
        assert await reopened.reset_channel_settings("discord:1")
        assert not await reopened.reset_channel_settings("discord:1")
        assert await reopened.channel_settings("discord:1") == {}
        assert await reopened.channel_settings("slack:T1:C1") == {"listen": "on"}
    finally:
        await reopened.close()


async def test_two_engines_on_one_redis_share_a_channels_settings(redis_url, tiny_model, make_settings):
    prefix = unique_prefix()
    settings = make_settings(memory_url=f"{redis_url}?prefix={prefix}")
    one_model, other_model = GatedModel(tiny_model), GatedModel(tiny_model)
    one = ReplyEngine(one_model, open_store(settings.memory_url, max_turns=5), settings)
    other = ReplyEngine(other_model, open_store(settings.memory_url, max_turns=5), settings)
    try:
        async with one, other:
            await one.set_persona("slack:T1:C1", "I love hiking | I have a dog")
            await one.set_listening("slack:T1:C1", True)
            # The other replica sees both at once: nothing is cached per process.
            assert await other.listening("slack:T1:C1")
            await other.reply("slack:T1:C1:1.1", "hello", channel="slack:T1:C1")
            assert other_model.personas == [[("I love hiking", "I have a dog")]]
            assert await other.reset_settings("slack:T1:C1")
            assert not await one.listening("slack:T1:C1")
            await one.reply("slack:T1:C1:1.2", "hello again", channel="slack:T1:C1")
            assert one_model.personas == [[()]]
    finally:
        delete_prefix(redis_url, prefix)


async def test_a_channels_persona_replaces_the_default_and_forgetting_a_dm_forgets_its_own(
    tiny_model, make_settings, tmp_path: Path
):
    model = GatedModel(tiny_model)
    settings = make_settings(persona=("I am a robot",), memory_url=f"sqlite:///{tmp_path}/memory.db")
    async with ReplyEngine(model, open_store(settings.memory_url, max_turns=5), settings) as engine:
        await engine.set_persona("discord:9", "I am a pirate")
        await engine.reply("discord:9", "ahoy", channel="discord:9")
        await engine.reply("discord:8", "hello", channel="discord:8")
        await engine.reply("web:x", "hi")  # no channel: the default
        assert model.personas == [[("I am a pirate",)], [("I am a robot",)], [("I am a robot",)]]

        assert await engine.reset("discord:9")  # a `reset` in a channel: its settings stay
        assert (await engine.channel_settings("discord:9")).persona == ("I am a pirate",)
        await engine.reply("discord:9", "ahoy again", channel="discord:9")
        assert await engine.reset("discord:9", with_settings=True)  # a person forgetting their DM
        assert await engine.channel_settings("discord:9") == ChannelSettings()
        # A DM with nothing but its settings still counts as something forgotten.
        await engine.set_persona("discord:7", "I am a cat")
        assert await engine.reset("discord:7", with_settings=True)


async def test_an_overheard_message_over_the_channels_rate_limit_gets_silence(tiny_model, make_settings):
    settings = make_settings()
    limiter = TokenBucketLimiter(burst=2, per_minute=1)
    async with ReplyEngine(tiny_model, open_store("memory://", max_turns=5), settings, limiter=limiter) as engine:
        # Two people, one listening channel: the channel's bucket runs out first.
        await engine.reply("discord:5", "one", user="u1", channel="discord:5", listened=True)
        await engine.reply("discord:5", "two", user="u2", channel="discord:5", listened=True)
        with pytest.raises(RateLimited) as silenced:
            await engine.reply("discord:5", "three", user="u3", channel="discord:5", listened=True)
        assert silenced.value.notify is False  # nobody asked the bot: no "you're too fast" notice
        # Addressed to the bot, only the person's own limit counts, with its notice.
        await engine.reply("discord:5", "four", user="u3", channel="discord:5")
        await engine.reply("discord:5", "five", user="u3", channel="discord:5")
        with pytest.raises(RateLimited) as told:
            await engine.reply("discord:5", "six", user="u3", channel="discord:5")
        assert told.value.notify is True


class BrokenSettings(InProcessStore):
    """A store whose channel settings cannot be read or written (a disk that failed, Redis down)."""

    async def channel_settings(self, channel: str) -> dict[str, str]:
        raise StoreUnavailable("down")

    async def set_channel_setting(self, channel: str, name: str, value: str) -> None:
        raise StoreUnavailable("down")


async def test_settings_that_cannot_be_read_leave_the_default_persona_and_no_listening(tiny_model, make_settings):
    model = GatedModel(tiny_model)
    async with ReplyEngine(model, BrokenSettings(max_turns=5), make_settings(persona=("I am a robot",))) as engine:
        assert await engine.reply("discord:1", "hello", channel="discord:1")  # answered all the same
        assert model.personas == [[("I am a robot",)]]
        assert not await engine.listening("discord:1")
        with pytest.raises(StoreUnavailable):
            await engine.set_persona("discord:1", "I am a pirate")
        errors = engine.metrics.registry.get_sample_value("blenderchat_errors_total", {"kind": "memory_write"})
        assert errors == 1
