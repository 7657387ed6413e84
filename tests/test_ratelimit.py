"""Abuse limits: per-user token buckets, one notice then silence, blocked users,
and one reply in flight per conversation."""

from __future__ import annotations

import asyncio

import pytest
from model_doubles import GatedModel

from adapters.base import IncomingMessage, answer
from bot.engine import ReplyEngine
from bot.errors import RateLimited, UserBlocked
from bot.memory import open_store
from bot.ratelimit import TokenBucketLimiter


class Clock:
    """A clock the test moves by hand, so refills need no waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def engine_for(model, settings) -> ReplyEngine:
    return ReplyEngine(model, open_store(settings.memory_url, max_turns=settings.memory_max_turns), settings)


async def outcomes(limiter: TokenBucketLimiter, user: str, count: int) -> list[str]:
    """"ok", "notice" or "silent" for each of `count` messages."""
    result = []
    for _ in range(count):
        try:
            await limiter.acquire(user)
            result.append("ok")
        except RateLimited as error:
            result.append("notice" if error.notify else "silent")
    return result


# -- the limiter -----------------------------------------------------------------


async def test_a_burst_then_one_notice_then_silence():
    limiter = TokenBucketLimiter(burst=3, per_minute=6, clock=Clock())
    assert await outcomes(limiter, "u", 8) == ["ok"] * 3 + ["notice"] + ["silent"] * 4


async def test_the_bucket_refills_at_the_configured_rate_and_the_notice_comes_back():
    clock = Clock()
    limiter = TokenBucketLimiter(burst=2, per_minute=6, clock=clock)  # a token every 10 s
    assert await outcomes(limiter, "u", 3) == ["ok", "ok", "notice"]
    with pytest.raises(RateLimited) as raised:
        await limiter.acquire("u")
    assert 9 < raised.value.retry_after <= 10 and "10s" in raised.value.user_message
    clock.now += 10
    assert await outcomes(limiter, "u", 3) == ["ok", "notice", "silent"]  # a new flood gets one notice again
    clock.now += 60
    assert await outcomes(limiter, "u", 3) == ["ok", "ok", "notice"]  # never more than the burst


async def test_other_users_are_unaffected():
    limiter = TokenBucketLimiter(burst=2, per_minute=1, clock=Clock())
    assert await outcomes(limiter, "flooder", 10) == ["ok", "ok", "notice"] + ["silent"] * 7
    assert await outcomes(limiter, "someone else", 2) == ["ok", "ok"]


async def test_blocked_users_are_refused_silently():
    limiter = TokenBucketLimiter(burst=5, per_minute=10, blocked={"U666"}, clock=Clock())
    with pytest.raises(UserBlocked) as raised:
        await limiter.acquire("U666")
    assert raised.value.notify is False
    await limiter.acquire("U667")


async def test_zero_per_minute_turns_limiting_off():
    limiter = TokenBucketLimiter(burst=1, per_minute=0, clock=Clock())
    assert await outcomes(limiter, "u", 50) == ["ok"] * 50


async def test_state_stays_bounded():
    clock = Clock()
    limiter = TokenBucketLimiter(burst=2, per_minute=60, max_buckets=100, clock=clock)
    for i in range(1000):
        await limiter.acquire(f"user{i}")
    assert len(limiter) == 100
    # Buckets that refilled are dropped: idle users cost nothing.
    clock.now += 5
    await limiter.acquire("newcomer")
    assert len(limiter) == 1
    # Eviction never gives an active flooder a fresh burst while under the cap.
    await outcomes(limiter, "flooder", 5)
    assert await outcomes(limiter, "flooder", 1) == ["silent"]


# -- through the engine ----------------------------------------------------------


async def test_a_burst_of_ten_gets_the_burst_and_one_notice_and_a_second_user_is_served(tiny_model, make_settings):
    model = GatedModel(tiny_model)
    # A line long enough for the whole burst: the rate limit is what this test is about.
    settings = make_settings(rate_limit_burst=3, rate_limit_per_minute=1, conversation_queue_size=16)
    async with engine_for(model, settings) as engine:
        flood = [IncomingMessage("discord", "discord:chan", "flooder", f"message {i}") for i in range(10)]
        replies = await asyncio.gather(*(answer(engine, message) for message in flood))
        other = await answer(engine, IncomingMessage("discord", "discord:chan", "bystander", "hi, how are you?"))
        history = await engine.history("discord:chan")

    notices = [r for r in replies if r is not None and "faster than I can answer" in r]
    answered = [r for r in replies if r is not None and r not in notices]
    assert len(answered) == 3 and len(notices) == 1
    assert replies.count(None) == 6  # deliberate silence, not ten notices
    assert other and "faster than I can answer" not in other
    assert [e.user for e in history] == ["message 0", "message 1", "message 2", "hi, how are you?"]
    assert len(model.batches) == 4  # the refused messages never reached the model


async def test_without_a_user_the_conversation_is_limited(tiny_model, make_settings):
    async with engine_for(GatedModel(tiny_model), make_settings(rate_limit_burst=2, rate_limit_per_minute=1)) as engine:
        await engine.reply("web:a", "one")
        await engine.reply("web:a", "two")
        with pytest.raises(RateLimited):
            await engine.reply("web:a", "three")
        assert await engine.reply("web:b", "one")  # another conversation has its own bucket


async def test_a_blocked_user_gets_silence_and_the_model_never_sees_the_message(tiny_model, make_settings):
    model = GatedModel(tiny_model)
    async with engine_for(model, make_settings(blocked_users=frozenset({"U666"}))) as engine:
        assert await answer(engine, IncomingMessage("slack", "slack:T:C", "U666", "hello")) is None
        assert await engine.history("slack:T:C") == [] and not model.batches
        assert await answer(engine, IncomingMessage("slack", "slack:T:C", "U667", "hello"))


async def test_one_reply_in_flight_per_conversation_and_later_messages_queue_in_order(tiny_model, make_settings):
    model = GatedModel(tiny_model)
    async with engine_for(model, make_settings()) as engine:
        model.gate.clear()  # the model holds its first call
        tasks = [asyncio.create_task(engine.reply("c", f"message {i}", user=f"u{i}")) for i in range(4)]
        await asyncio.to_thread(model.wait_for_calls, 1)
        await asyncio.sleep(0.3)  # room for any wrongly concurrent call to show up
        assert [turns[-1] for batch in model.batches for turns in batch] == ["message 0"]
        model.gate.set()
        await asyncio.gather(*tasks)
        history = await engine.history("c")
    assert [e.user for e in history] == [f"message {i}" for i in range(4)]
    # Each message was generated seeing every exchange before it.
    turns_seen = [turns for batch in model.batches for turns in batch]
    assert [len(turns) for turns in turns_seen] == [1, 3, 5, 7]
