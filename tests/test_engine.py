"""The reply engine: batching, ordering, backpressure, failures and memory."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from conftest import RUNTIMES
from model_doubles import GatedModel
from redis_servers import delete_prefix, redis_url, unique_prefix  # noqa: F401 (redis_url is a fixture)
from tcp_proxy import TcpProxy

from adapters.base import IncomingMessage, answer
from bot.engine import TOO_SLOW, ReplyEngine
from bot.errors import (
    ConversationBusy,
    EmptyMessage,
    EngineBusy,
    EngineClosed,
    GenerationFailed,
    MessageTooLong,
    RateLimited,
    ReplyTimeout,
)
from bot.memory import open_store
from bot.shared import RedisRateLimiter, connect


@pytest.fixture(params=RUNTIMES)
def model(request, tiny_models):
    """Every test here runs on both runtimes: the engine must not care which serves it."""
    return GatedModel(tiny_models[request.param])


def engine_for(model, settings):
    return ReplyEngine(model, open_store(settings.memory_url, max_turns=settings.memory_max_turns), settings)


async def test_reply_answers_and_remembers_the_exchange(model, make_settings):
    async with engine_for(model, make_settings()) as engine:
        answer = await engine.reply("c", "Hello there!")
        assert answer and answer == answer.strip()
        history = await engine.history("c")
        assert [e.user for e in history] == ["Hello there!"]
        assert history[0].bot.strip()  # stored as decoded


async def test_each_message_sees_the_previous_exchanges(model, make_settings):
    async with engine_for(model, make_settings()) as engine:
        await engine.reply("c", "first")
        await engine.reply("c", "second")
    first_turns = model.batches[0][0]
    second_turns = model.batches[1][0]
    assert first_turns == ["first"]
    assert second_turns[0] == "first" and second_turns[-1] == "second" and len(second_turns) == 3


async def test_concurrent_messages_of_one_conversation_are_answered_in_order(model, make_settings):
    async with engine_for(model, make_settings()) as engine:
        await asyncio.gather(*[engine.reply("c", f"message {i}") for i in range(6)])
        history = await engine.history("c")
    assert [e.user for e in history] == [f"message {i}" for i in range(6)]
    # Every generation saw all the earlier exchanges of its conversation.
    for i, batch in enumerate(model.batches):
        assert batch[0][::2] == [f"message {j}" for j in range(i + 1)]


async def test_concurrent_conversations_share_one_generate_call(model, make_settings):
    async with engine_for(model, make_settings(batch_size=32)) as engine:
        model.gate.clear()  # hold the first call so the others queue behind it
        first = asyncio.create_task(engine.reply("c0", "hi"))
        await asyncio.to_thread(model.wait_for_calls, 1)
        others = [asyncio.create_task(engine.reply(f"c{i}", f"hi {i}")) for i in range(1, 9)]
        await asyncio.sleep(0.05)
        model.gate.set()
        answers = await asyncio.gather(first, *others)
    assert all(answers)
    assert [len(batch) for batch in model.batches] == [1, 8]


async def test_batch_size_setting_caps_a_batch(model, make_settings):
    async with engine_for(model, make_settings(batch_size=3)) as engine:
        model.gate.clear()
        first = asyncio.create_task(engine.reply("c0", "hi"))
        await asyncio.to_thread(model.wait_for_calls, 1)
        others = [asyncio.create_task(engine.reply(f"c{i}", "hi")) for i in range(1, 8)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *others)
    assert [len(batch) for batch in model.batches] == [1, 3, 3, 1]


async def test_event_loop_keeps_running_while_the_model_works(model, make_settings):
    model.delay = 1.0  # a long generation, blocking its thread
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    async with engine_for(model, make_settings()) as engine:
        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await engine.reply("c", "hello")
        elapsed = time.monotonic() - started
        task.cancel()
    assert elapsed >= 1.0
    assert ticks >= 20  # ~50 expected; a blocked loop would give 0 or 1


async def test_full_queue_refuses_at_once_with_busy(model, make_settings):
    async with engine_for(model, make_settings(queue_size=2)) as engine:
        model.gate.clear()
        waiting = [asyncio.create_task(engine.reply(f"c{i}", "hi")) for i in range(2)]
        await asyncio.to_thread(model.wait_for_calls, 1)
        with pytest.raises(EngineBusy) as busy:
            await asyncio.wait_for(engine.reply("c9", "hi"), 1)
        assert "try again" in busy.value.user_message
        model.gate.set()
        assert all(await asyncio.gather(*waiting))
        assert await engine.reply("c9", "hi")  # served again once the queue drained


async def test_slow_generation_times_out_and_the_engine_keeps_serving(model, make_settings):
    async with engine_for(model, make_settings(reply_timeout=1.0)) as engine:
        model.gate.clear()
        with pytest.raises(ReplyTimeout):
            await engine.reply("c", "are you there?")
        model.gate.set()
        assert await engine.reply("c", "hello again")
        assert [e.user for e in await engine.history("c")] == ["hello again"]


async def test_generation_error_is_reported_not_stored_and_the_engine_recovers(model, make_settings, caplog):
    async with engine_for(model, make_settings()) as engine:
        model.failures = 1
        with pytest.raises(GenerationFailed) as failed:
            await engine.reply("c", "hello")
        assert "Traceback" not in failed.value.user_message
        assert "simulated CUDA out of memory" in caplog.text  # logged with its traceback
        assert await engine.history("c") == []
        assert await engine.reply("c", "hello")
        assert len(await engine.history("c")) == 1


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\u200b\u200b", "\x00\x07"])
async def test_empty_text_is_rejected_and_nothing_is_generated(model, make_settings, text):
    async with engine_for(model, make_settings()) as engine:
        with pytest.raises(EmptyMessage):
            await engine.reply("c", text)
    assert model.batches == []


async def test_too_long_text_is_refused_with_the_limit(model, make_settings):
    async with engine_for(model, make_settings(max_input_chars=100)) as engine:
        with pytest.raises(MessageTooLong) as refused:
            await engine.reply("c", "x" * 101)
        assert "at most 100 characters" in refused.value.user_message  # 100 itself is allowed
        assert await engine.reply("c", "x" * 100)
    assert len(model.batches) == 1


async def test_reset_forgets_the_conversation(model, make_settings):
    async with engine_for(model, make_settings()) as engine:
        await engine.reply("c", "remember this")
        await engine.reply("other", "and this")
        assert await engine.reset("c") is True
        assert await engine.history("c") == []
        assert len(await engine.history("other")) == 1


async def test_memory_survives_an_engine_restart_on_the_same_sqlite_file(model, make_settings, tmp_path):
    settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db")
    async with engine_for(model, settings) as engine:
        await engine.reply("c", "my name is Ada")
    async with engine_for(model, settings) as engine:
        assert [e.user for e in await engine.history("c")] == ["my name is Ada"]
        await engine.reply("c", "what is my name?")
    assert model.batches[-1][0][0] == "my name is Ada"


async def test_a_failure_while_storing_keeps_the_answer_and_stores_nothing_partial(model, make_settings, tmp_path):
    path = tmp_path / "memory.db"
    settings = make_settings(memory_url=f"sqlite:///{path}")
    async with engine_for(model, settings) as engine:
        await engine.reply("c", "first")
        with sqlite3.connect(path) as db:
            db.execute("CREATE TRIGGER crash BEFORE UPDATE ON conversations BEGIN SELECT RAISE(ABORT, 'crash'); END")
        assert await engine.reply("c", "second")  # the user still gets the answer
        assert [e.user for e in await engine.history("c")] == ["first"]
        metrics = engine.metrics.render().decode()
    assert 'blenderchat_errors_total{kind="memory_write"} 1.0' in metrics


async def test_close_lets_replies_in_flight_finish_and_refuses_new_ones(model, make_settings):
    engine = engine_for(model, make_settings())
    await engine.start()
    model.delay = 0.5
    in_flight = asyncio.create_task(engine.reply("c", "hello"))
    await asyncio.to_thread(model.wait_for_calls, 1)
    closing = asyncio.create_task(engine.close(timeout=5))
    await asyncio.sleep(0)
    with pytest.raises(EngineClosed):
        await engine.reply("c2", "too late")
    assert await in_flight
    await closing


async def test_metrics_count_replies_batches_and_tokens(model, make_settings):
    async with engine_for(model, make_settings()) as engine:
        await engine.reply("c", "hello", platform="discord")
        with pytest.raises(EmptyMessage):
            await engine.reply("c", " ", platform="discord")
        metrics = engine.metrics.render().decode()
    assert 'blenderchat_replies_total{outcome="ok",platform="discord"} 1.0' in metrics
    assert 'blenderchat_replies_total{outcome="empty",platform="discord"} 1.0' in metrics
    assert "blenderchat_batch_size_count 1.0" in metrics
    assert "blenderchat_generated_tokens_total 0.0" not in metrics


async def test_a_burst_of_conversations_is_answered_by_one_generate_call(model, make_settings, tmp_path):
    """Messages arriving together are each checked and read from memory before
    they queue; the batch waits for them instead of sending the first alone."""
    settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db", batch_wait_ms=2000)
    async with engine_for(model, settings) as engine:
        await engine.reply("warm-up", "hello")
        model.batches.clear()
        answers = await asyncio.gather(*[engine.reply(f"c{i}", f"hi {i}") for i in range(8)])
    assert all(answers)
    assert [len(batch) for batch in model.batches] == [8]


async def test_a_burst_waits_for_messages_whose_place_in_line_is_taken(model, make_settings):
    """Adapters take a message's ticket first thing, then do their own work before
    `reply` (the web API records the message in its inbox, a SQLite write): a burst
    reaches the engine spread out. Those messages are on their way from their
    ticket on, so the first is not sent alone while the others catch up."""
    async with engine_for(model, make_settings(batch_wait_ms=2000)) as engine:
        await engine.reply("warm-up", "hello")
        model.batches.clear()
        tickets = [engine.take_ticket(f"c{i}") for i in range(8)]  # the burst arrives

        async def message(i: int) -> str:
            with tickets[i]:
                if i:
                    await asyncio.sleep(0.2)  # the adapter's own work, after the first reached the queue
                return await engine.reply(f"c{i}", f"hi {i}", ticket=tickets[i])

        answers = await asyncio.gather(*[message(i) for i in range(8)])
    assert all(answers)
    assert [len(batch) for batch in model.batches] == [8]


async def test_a_free_runtime_worker_starts_on_a_message_while_the_other_is_busy(model, make_settings):
    """With a runtime of two workers (CTranslate2 on two cores), a message arriving
    while a batch runs is not held back until it finishes: it goes to the idle
    worker at once. A third waits for a worker and then goes with all that queued."""
    model.workers = 2
    async with engine_for(model, make_settings(batch_size=32)) as engine:
        model.gate.clear()  # hold every generate call
        first = asyncio.create_task(engine.reply("c0", "hi"))
        await asyncio.to_thread(model.wait_for_calls, 1)
        second = asyncio.create_task(engine.reply("c1", "hi"))
        await asyncio.to_thread(model.wait_for_calls, 2)  # both workers busy
        later = [asyncio.create_task(engine.reply(f"c{i}", "hi")) for i in range(2, 6)]
        await asyncio.sleep(0.1)
        assert len(model.batches) == 2  # no third call while both workers are held
        model.gate.set()
        answers = await asyncio.gather(first, second, *later)
    assert all(answers)
    assert [len(batch) for batch in model.batches] == [1, 1, 4]


async def test_a_lone_message_does_not_wait_for_a_batch(model, make_settings):
    async with engine_for(model, make_settings(batch_wait_ms=5000)) as engine:
        started = time.monotonic()
        await engine.reply("c", "hello")
        assert time.monotonic() - started < 4  # far below the 5 s it would wait for company


# -- order at intake, fairness (issue 12, items 1 and 2) --------------------------


@pytest.fixture
async def slow_redis(redis_url):
    """A TCP proxy in front of the test Redis, to slow single commands down; its
    keys on a prefix of this test, deleted afterwards."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    prefix = unique_prefix()
    client = connect(proxy.url())
    yield proxy, client, prefix
    await client.aclose()
    await proxy.close()
    delete_prefix(redis_url, prefix)


async def test_a_slow_first_rate_limit_call_does_not_let_the_next_message_overtake(model, make_settings, slow_redis):
    proxy, client, prefix = slow_redis
    limiter = RedisRateLimiter(client, burst=5, per_minute=60, prefix=prefix)  # the replicas' shared buckets
    settings = make_settings()
    engine = ReplyEngine(model, open_store("memory://", max_turns=10), settings, limiter=limiter)
    async with engine:
        proxy.delay_next(b"EVALSHA", 1.5)  # the first limiter call waits on a slow network
        first = asyncio.create_task(engine.reply("c", "my name is Ada"))
        second = asyncio.create_task(engine.reply("c", "what is my name?"))
        assert all(await asyncio.gather(first, second))
        history = await engine.history("c")
    assert proxy.count(b"EVALSHA") >= 2  # both went through the shared limiter
    assert [exchange.user for exchange in history] == ["my name is Ada", "what is my name?"]
    prompts = [turns for batch in model.batches for turns in batch]
    assert prompts[1][:2] == ["my name is Ada", history[0].bot]  # the second saw the first


async def test_a_conversation_never_wedges_whatever_happens_to_a_message(model, make_settings):
    """Every way a message can end frees its place in line: refused, failed,
    timed out, rate limited, cancelled while waiting, a ticket never used."""
    settings = make_settings(reply_timeout=2.0, rate_limit_burst=2, rate_limit_per_minute=1)
    async with engine_for(model, settings) as engine:
        with pytest.raises(EmptyMessage):
            await engine.reply("c", "  ")
        model.failures = 1
        with pytest.raises(GenerationFailed):
            await engine.reply("c", "boom", user="u1")
        model.gate.clear()
        held = asyncio.create_task(engine.reply("c", "held", user="u2"))
        await asyncio.to_thread(model.wait_for_calls, 2)
        waiting = asyncio.create_task(engine.reply("c", "waiting", user="u3"))
        await asyncio.sleep(0.1)
        waiting.cancel()  # e.g. the platform adapter shut down
        with pytest.raises(ReplyTimeout):
            await held
        model.gate.set()
        unused = engine.take_ticket("c")  # an adapter that decided not to answer after all
        unused.release()
        unused.release()  # releasing twice is harmless
        assert await engine.reply("c", "one", user="u4") and await engine.reply("c", "two", user="u4")
        with pytest.raises(RateLimited):
            await engine.reply("c", "three", user="u4")
        assert await asyncio.wait_for(engine.reply("c", "still answered", user="u5"), 10)
        assert len(engine._lines) == 0  # nothing left in line
    assert [e.user for e in await engine.history("c")] == ["one", "two", "still answered"]


async def test_a_ticket_taken_at_intake_fixes_the_order_whatever_comes_before_reply(model, make_settings):
    """What an adapter does: take the ticket when the message arrives, then await
    whatever it needs (a dedupe call, a name lookup), then reply with the ticket."""
    async with engine_for(model, make_settings()) as engine:

        async def arrive(text: str, slow_before: float) -> str:
            ticket = engine.take_ticket("c")
            with ticket:
                await asyncio.sleep(slow_before)  # the adapter's own awaits, slower for the first message
                return await engine.reply("c", text, ticket=ticket)

        await asyncio.gather(arrive("first", 0.5), arrive("second", 0.0), arrive("third", 0.2))
        assert [e.user for e in await engine.history("c")] == ["first", "second", "third"]
        with pytest.raises(ValueError):
            await engine.reply("other", "hi", ticket=engine.take_ticket("c"))


async def test_a_long_line_in_one_conversation_is_refused_at_once_with_one_notice(model, make_settings):
    settings = make_settings(conversation_queue_size=3)
    async with engine_for(model, settings) as engine:
        model.gate.clear()
        flood = [asyncio.create_task(answer(engine, IncomingMessage("discord", "c", "u", f"m{i}"))) for i in range(12)]
        await asyncio.to_thread(model.wait_for_calls, 1)
        other = asyncio.create_task(engine.reply("elsewhere", "hello", user="v"))
        while sum(task.done() for task in flood) < 9:  # refused while the model still holds the first
            await asyncio.sleep(0.01)
        refused = [task.result() for task in flood[3:]]
        assert refused[0] == ConversationBusy.user_message and refused[1:] == [None] * 8  # one notice, then silence
        assert not any(task.done() for task in flood[:3]) and not other.done()
        model.gate.set()
        assert all(await asyncio.gather(*flood[:3], other))
        assert [e.user for e in await engine.history("c")] == ["m0", "m1", "m2"]
        # The line has room again: the next refusal is told again.
        model.gate.clear()
        again = [asyncio.create_task(answer(engine, IncomingMessage("discord", "c", "u", f"n{i}"))) for i in range(5)]
        await asyncio.wait_for(asyncio.gather(*again[3:]), 10)
        assert again[3].result() == ConversationBusy.user_message
        model.gate.set()
        await asyncio.gather(*again)
        metrics = engine.metrics.render().decode()
    assert 'blenderchat_replies_total{outcome="conversation_busy",platform="discord"} 11.0' in metrics


async def test_a_message_that_cannot_be_answered_in_time_is_refused_at_once(model, make_settings):
    """REPLY_TIMEOUT 2.5 s and a reply measured at about 1 s: a message with two or
    more ahead of it would wait past the timeout, so it hears "busy" now rather
    than "took too long" minutes later."""
    settings = make_settings(reply_timeout=2.5)
    async with engine_for(model, settings) as engine:
        model.delay = 1.0
        await engine.reply("c", "warm-up")  # the engine measures a reply at about a second
        model.delay = 0.0
        model.gate.clear()
        tasks = [asyncio.create_task(answer(engine, IncomingMessage("web", "c", "u", f"m{i}"))) for i in range(6)]
        while sum(task.done() for task in tasks) < 4:  # the late four, while the model still holds the first
            await asyncio.sleep(0.01)
        assert [task.done() for task in tasks] == [False] * 2 + [True] * 4
        assert tasks[2].result() == TOO_SLOW and [task.result() for task in tasks[3:]] == [None] * 3
        model.gate.set()
        await asyncio.gather(*tasks[:2])
        assert [e.user for e in await engine.history("c")] == ["warm-up", "m0", "m1"]
        metrics = engine.metrics.render().decode()
    assert 'blenderchat_replies_total{outcome="busy",platform="web"} 4.0' in metrics


async def test_an_exchange_is_stored_under_the_id_its_caller_gives(model, make_settings, tmp_path):
    """What a replay after a crash relies on: the same message answered twice under its id is remembered once."""
    settings = make_settings(memory_url=f"sqlite:///{tmp_path}/memory.db")
    async with engine_for(model, settings) as engine:
        assert await engine.reply("c", "hello", exchange_id="msg-1")
        assert await engine.reply("c", "hello", exchange_id="msg-1")  # answered again: stored once
        assert await engine.reply("c", "and you?")
        history = await engine.history("c")
    assert [e.user for e in history] == ["hello", "and you?"]
    assert history[0].id == "msg-1" and history[1].id and history[1].id != "msg-1"
