"""The reply engine: batching, ordering, backpressure, failures and memory."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from conftest import RUNTIMES
from model_doubles import GatedModel

from bot.engine import ReplyEngine
from bot.errors import EmptyMessage, EngineBusy, EngineClosed, GenerationFailed, MessageTooLong, ReplyTimeout
from bot.memory import open_store


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
        assert "100" in refused.value.user_message
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


async def test_a_lone_message_does_not_wait_for_a_batch(model, make_settings):
    async with engine_for(model, make_settings(batch_wait_ms=5000)) as engine:
        started = time.monotonic()
        await engine.reply("c", "hello")
        assert time.monotonic() - started < 4  # far below the 5 s it would wait for company
