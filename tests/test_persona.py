"""A persona in BlenderBot's own format (Blended Skill Talk's `your persona:` lines),
token by token for both families, at the window's edge, and through the engine."""

from __future__ import annotations

import pytest
from conftest import RUNTIMES
from model_doubles import GatedModel

from bot.config import load_settings
from bot.engine import ReplyEngine
from bot.errors import PersonaRefused
from bot.memory import open_store
from bot.model import load_chat_model
from bot.prompt import (
    PersonaTooLong,
    check_persona,
    encode_persona,
    encode_turns,
    persona_limit,
    persona_lines,
    separator_ids,
)
from bot.startup import StartupError, start_engine

PERSONA = ("I love hiking.", "I have a dog named Max.")


@pytest.fixture(scope="module")
def small_model(blenderbot_small_dir, ct2_dir):
    from bot.config import Settings

    return load_chat_model(Settings(model=str(blenderbot_small_dir), max_new_tokens=6, num_beams=1, ct2_dir=ct2_dir))


@pytest.fixture(params=["blenderbot", "blenderbot-small"])
def model(request, tiny_model, small_model):
    return tiny_model if request.param == "blenderbot" else small_model


def test_the_persona_block_is_bst_lines_each_ending_in_a_newline(tiny_model, small_model):
    """BST's first context: `your persona: <fact>` lines joined by newlines, a newline before the talk."""
    tokenizer = tiny_model.tokenizer
    ids = encode_persona(tokenizer, tiny_model.family, PERSONA)
    assert ids == tokenizer("your persona: I love hiking.\nyour persona: I have a dog named Max.\n",
                            add_special_tokens=False)["input_ids"]  # fmt: skip
    assert tokenizer.decode(ids) == " your persona: I love hiking.\nyour persona: I have a dog named Max.\n"
    assert tokenizer.convert_ids_to_tokens(ids).count("Ċ") == 2  # the newline is a token of its own

    small = small_model.tokenizer
    small_ids = encode_persona(small, small_model.family, PERSONA)
    tokens = small.convert_ids_to_tokens(small_ids)
    assert tokens.count("__newln__") == 2  # BlenderBot-small writes each newline as its __newln__ token
    assert small.decode(small_ids) == "your persona: i love hiking . __newln__ your persona: i have a dog named max . __newln__"


def test_a_persona_comes_first_then_the_conversation_as_without_one(model):
    tokenizer, family = model.tokenizer, model.family
    turns = ["hello there, how are you doing today?", " i am fine thank you.", "do you have any pets?"]
    head = encode_persona(tokenizer, family, PERSONA)
    ids = encode_turns(tokenizer, family, turns, 128, PERSONA)
    assert ids[: len(head)] == head
    assert ids[len(head) :] == encode_turns(tokenizer, family, turns, 128)  # nothing cut: the same ids behind it
    assert not set(head) & {tokenizer.eos_token_id, tokenizer.bos_token_id}  # the block is text, no turn boundary


def test_at_the_windows_edge_the_persona_stays_whole_and_the_oldest_turns_go(model):
    tokenizer, family = model.tokenizer, model.family
    window = 128  # BlenderBot's position table; BlenderBot-small cut to the same width to reach its edge
    turns = [f"turn {i}: tell me about the ocean and the stars" for i in range(40)] + ["what is your favourite food?"]
    head = encode_persona(tokenizer, family, PERSONA)
    ids = encode_turns(tokenizer, family, turns, window, PERSONA)
    assert len(ids) == window
    assert ids[: len(head)] == head
    without = encode_turns(tokenizer, family, turns, window - len(head))
    assert ids[len(head) :] == without  # the history behind the persona is cut from the left, exactly as before
    newest = tokenizer(turns[-1].strip(), add_special_tokens=False)["input_ids"]
    suffix = [tokenizer.eos_token_id] if family.append_eos else []
    assert ids[len(ids) - len(suffix) - len(newest) :] == newest + suffix  # the newest message whole, last
    separator = separator_ids(tokenizer, family)
    boundaries = sum(ids[i : i + len(separator)] == separator for i in range(len(ids)))
    assert boundaries < len(turns) - 1  # old turns really went


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_persona_reaches_the_model_at_the_real_position_limit(tiny_models, runtime):
    """The longest allowed persona and a conversation filling the window: the model answers, no position error."""
    model = tiny_models[runtime]
    limit = persona_limit(model.family, model.max_positions)
    fact = "i like to read books and play the guitar with my friends."
    persona = [fact]
    while len(encode_persona(model.tokenizer, model.family, [*persona, fact])) <= limit:
        persona.append(fact)
    assert len(encode_persona(model.tokenizer, model.family, persona)) <= limit
    turns = ["tell me something interesting about the ocean and the stars " * 20]
    assert len(model.encode(turns, persona)) == model.max_positions
    (reply,) = model.generate([turns], personas=[persona])
    assert reply.new_tokens > 0


def test_a_persona_too_long_to_leave_room_is_refused_with_its_limit(tiny_model, small_model):
    assert persona_limit(tiny_model.family, 128) == 63  # half of what the </s> leaves
    assert persona_limit(small_model.family, 512) == 256
    long = ["i like to read books and play the guitar with my friends."] * 10
    with pytest.raises(PersonaTooLong) as refused:
        check_persona(tiny_model.tokenizer, tiny_model.family, long, 128)
    assert refused.value.limit == 63 and refused.value.tokens > 63
    assert "may be at most 63" in str(refused.value)
    check_persona(tiny_model.tokenizer, tiny_model.family, PERSONA, 128)  # a short one passes


@pytest.mark.parametrize(
    "text, lines",
    [
        ("I love hiking | I have a dog", ("I love hiking", "I have a dog")),
        ("I love hiking\nI have a dog\n", ("I love hiking", "I have a dog")),
        (" | |  ", ()),
        ("", ()),
    ],
)
def test_persona_lines_are_separated_by_bars_or_newlines(text, lines):
    assert persona_lines(text) == lines


def test_the_persona_setting_is_read_from_the_environment():
    assert load_settings({"PERSONA": "I love hiking|I have a dog"}, dotenv=False).persona == (
        "I love hiking", "I have a dog"
    )
    assert load_settings({}, dotenv=False).persona == ()


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_default_persona_goes_with_every_reply(tiny_models, make_settings, runtime):
    model = GatedModel(tiny_models[runtime])
    settings = make_settings(persona=PERSONA)
    async with ReplyEngine(model, open_store("memory://", max_turns=20), settings) as engine:
        await engine.reply("c1", "hello there")
        await engine.reply("c2", "what do you like to do for fun?")
    assert model.personas == [[PERSONA], [PERSONA]]
    assert all(turns[-1] in ("hello there", "what do you like to do for fun?") for b in model.batches for turns in b)


async def test_an_unsafe_or_empty_persona_is_refused(tiny_model, make_settings, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("zorblax\n", encoding="utf-8")
    async with ReplyEngine(tiny_model, open_store("memory://", max_turns=20), make_settings(safety_blocklist=blocklist)) as engine:
        assert await engine.check_persona("I love hiking | I have a dog") == ("I love hiking", "I have a dog")
        with pytest.raises(PersonaRefused, match="safety filter"):
            await engine.check_persona("I love hiking | I am a zorblax")
        with pytest.raises(PersonaRefused, match="at least one line"):
            await engine.check_persona(" | ")
        with pytest.raises(PersonaRefused, match="may be at most 63"):
            await engine.check_persona("|".join(["i like to read books and play the guitar with my friends."] * 10))


async def test_a_persona_setting_too_long_stops_start_up_with_one_line(tiny_model, make_settings):
    settings = make_settings(persona=("i like to read books and play the guitar with my friends.",) * 10)
    engine = ReplyEngine(tiny_model, open_store("memory://", max_turns=20), settings)
    with pytest.raises(StartupError) as refused:
        await start_engine(settings, engine)
    assert refused.value.status == 2
    assert str(refused.value).startswith("PERSONA cannot be used: That persona is")
