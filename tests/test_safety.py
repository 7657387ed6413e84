"""The safety filter, and hostile or odd input through the engine: every message
gets a clear answer or a deliberate silence, nothing crashes, nothing pings, and
unsafe text is never sent nor stored."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import pytest
from conftest import subprocess_env
from model_doubles import SAFE_REPLY, GatedModel

from adapters.base import APOLOGY, IncomingMessage, answer
from bot.chat_model import Generated
from bot.engine import ReplyEngine
from bot.memory import open_store
from bot.safety import SafetyFilter, load_classifier
from bot.text import clean_text, neutralize_mentions

# A mention that would still ping: "@" right before a broadcast name, or an
# angle-bracket token of either platform.
LIVE_MENTION = re.compile(r"<[@!]|@(?:everyone|here|channel)\b", re.IGNORECASE)
BLOCKLIST = "# operator's list\nzorblax\n\npurple monkey\n"
DEFLECTION = "Let's talk about something else, shall we? @here"


@pytest.fixture
def blocklist(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text(BLOCKLIST, encoding="utf-8")
    return path


@pytest.fixture
def settings(make_settings, blocklist):
    return make_settings(safety_blocklist=blocklist, safety_deflection=DEFLECTION)


class RewrittenModel(GatedModel):
    """The real tiny model, with the text of its answers rewritten by the test
    (`rewrite(text, sample)`), to stand for a model that says something unsafe."""

    def __init__(self, model, rewrite: Callable[[str, bool], str]) -> None:
        super().__init__(model)
        self.rewrite = rewrite

    def generate(
        self, conversations: Sequence[Sequence[str]], *, sample: bool = False,
        personas: Sequence[Sequence[str]] | None = None,
    ) -> list[Generated]:
        results = super().generate(conversations, sample=sample, personas=personas)
        return [Generated(self.rewrite(r.text, sample), r.new_tokens) for r in results]


def engine_for(model, settings) -> ReplyEngine:
    return ReplyEngine(model, open_store(settings.memory_url, max_turns=settings.memory_max_turns), settings)


def blocked(engine: ReplyEngine, direction: str) -> float:
    return engine.metrics.registry.get_sample_value("blenderchat_safety_blocked_total", {"direction": direction})


# -- the filter itself ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["zorblax", "ZORBLAX!", "You ZorBlax.", "a purple monkey", "PURPLE\n  Monkey", "ｚｏｒｂｌａｘ", "zor\u200dblax"],
)
def test_blocklisted_words_and_phrases_match_in_any_case(text):
    assert SafetyFilter(blocklist=["zorblax", "Purple Monkey"]).is_unsafe(text)


@pytest.mark.parametrize("text", ["zorblaxes", "unzorblax", "purple monkeys", "a purple dog", "monkey purple"])
def test_blocklist_matches_whole_words_only(text):
    assert not SafetyFilter(blocklist=["zorblax", "purple monkey"]).is_unsafe(text)


def test_the_classifier_flags_insults_and_passes_small_talk():
    safety = SafetyFilter(classifier=load_classifier())
    assert safety.is_unsafe("you are a fucking idiot")
    assert not safety.is_unsafe("I like to read books and play the guitar. Do you have any pets?")


def test_the_allowlist_undoes_a_false_positive_but_not_the_blocklist():
    classifier = load_classifier()
    assert SafetyFilter(classifier=classifier).is_unsafe("I hate mondays")  # the classifier's false positive
    allowing = SafetyFilter(classifier=classifier, allowlist=["hate", "zorblax"], blocklist=["zorblax"])
    assert not allowing.is_unsafe("I hate mondays")
    assert allowing.is_unsafe("you idiot, I hate you")  # other words still count
    assert allowing.is_unsafe("zorblax")


def test_safety_off_lets_everything_through(make_settings, blocklist):
    safety = SafetyFilter.from_settings(make_settings(safety=False, safety_blocklist=blocklist))
    assert not safety.is_unsafe("zorblax") and not safety.is_unsafe("you are a fucking idiot")


def test_from_settings_reads_the_list_files(make_settings, blocklist, tmp_path):
    allowlist = tmp_path / "allow.txt"
    allowlist.write_text("hate\n", encoding="utf-8")
    safety = SafetyFilter.from_settings(make_settings(safety_blocklist=blocklist, safety_allowlist=allowlist))
    assert safety.is_unsafe("Purple Monkey") and safety.is_unsafe("zorblax")
    assert not safety.is_unsafe("# operator's list")  # comment lines are not phrases
    assert not safety.is_unsafe("I hate mondays")


async def test_the_classifier_runs_off_the_event_loop():
    threads = []
    real = load_classifier()

    def classifier(texts):
        threads.append(threading.current_thread())
        return real(texts)

    assert await SafetyFilter(classifier=classifier).check("you are a fucking idiot")
    assert threads and threading.main_thread() not in threads


def test_importing_the_engine_does_not_load_the_classifier():
    code = "import sys, bot.engine, bot.safety; print('profanity_check' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# -- hostile and odd input through the engine ----------------------------------

HOSTILE = {
    "empty": ("", "notice"),
    "only spaces and controls": (" \x00\x07\u200b\n\t", "notice"),
    "mention only": ("<@123456789>", "model"),
    "slack mention only": ("<@U024BE7LH>", "model"),
    "100,000 characters": ("x" * 100_000, "notice"),
    "control and zero-width": ("hel\x00lo\u200b the\x1bre\ufeff, how\u2060 are\x7f you?", "model"),
    "right-to-left": ("שלום, מה שלומך? مرحبا كيف حالك", "model"),
    "bidi override": ("abc \u202egnp.exe", "model"),
    "emoji": ("👩‍💻 🏳️‍🌈 👍🏽 🙂", "model"),
    "code fence": ("```python\nprint('hi')\n```", "model"),
    "@everyone": ("@everyone look at this", "model"),
    "slack broadcasts": ("<!channel> <!here> <!everyone> <!subteam^S123|@devs> hello", "model"),
    "discord role and user": ("<@&42> <@!7> hey", "model"),
    "block-listed, lower case": ("you are a zorblax", "deflection"),
    "block-listed, upper case": ("YOU ARE A ZORBLAX", "deflection"),
    "block-listed, mixed case phrase": ("what a Purple MONKEY!", "deflection"),
    "offensive": ("shut up you stupid fucking bot", "deflection"),
}


@pytest.mark.parametrize("text,expected", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_and_odd_input_gets_a_clear_answer_and_pings_nobody(tiny_model, settings, text, expected, caplog):
    model = GatedModel(tiny_model)
    async with engine_for(model, settings) as engine:
        reply = await answer(engine, IncomingMessage("api", "c", "u1", text))
        history = await engine.history("c")

    assert reply and reply.strip(), "every one of these deserves an answer, not silence"
    assert reply != APOLOGY and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not LIVE_MENTION.search(reply)
    if expected == "model":
        assert model.batches and len(history) == 1
        assert history[0].user == clean_text(text)  # what the model saw, and what is remembered
    else:
        assert not model.batches and history == []  # never shown to the model, nothing stored
    if expected == "deflection":
        assert reply == neutralize_mentions(DEFLECTION)


async def test_right_to_left_text_and_emoji_reach_the_model_intact(tiny_model, settings):
    text = "שלום 👩‍💻 مرحبا 🏳️‍🌈 می‌خواهم"
    async with engine_for(GatedModel(tiny_model), settings) as engine:
        await engine.reply("c", text)
        assert (await engine.history("c"))[0].user == text


async def test_mentions_the_model_writes_are_defused(tiny_model, settings):
    pings = " @everyone @here <@123> <@!123> <@&9> <!channel> <!here> <!everyone> <!subteam^S1> <@U1|bob>"
    model = RewrittenModel(tiny_model, lambda text, sample: pings)
    async with engine_for(model, settings) as engine:
        reply = await engine.reply("c", "say something")
    assert not LIVE_MENTION.search(reply)
    assert "everyone" in reply and "channel" in reply and "bob" in reply  # still readable


async def test_an_unsafe_message_is_deflected_counted_and_not_logged(tiny_model, settings, caplog):
    caplog.set_level(logging.INFO)
    model = GatedModel(tiny_model)
    async with engine_for(model, settings) as engine:
        reply = await engine.reply("c", "tell me about the ZORBLAX conspiracy")
        assert reply == neutralize_mentions(DEFLECTION)
        assert await engine.history("c") == [] and not model.batches
        assert blocked(engine, "input") == 1
    assert "blocked" in caplog.text and "ZORBLAX" not in caplog.text and "conspiracy" not in caplog.text


# -- unsafe model output -------------------------------------------------------


def test_the_harmless_reply_the_tests_use_passes_the_filter(settings):
    # Tests that need a safe model reply use SAFE_REPLY, never the tiny model's sampled text.
    assert not SafetyFilter.from_settings(settings).is_unsafe(SAFE_REPLY)


async def test_an_unsafe_reply_is_retried_with_sampling_and_only_the_safe_one_is_kept(tiny_model, settings, caplog):
    caplog.set_level(logging.INFO)
    model = RewrittenModel(tiny_model, lambda text, sample: SAFE_REPLY if sample else " you zorblax")
    async with engine_for(model, settings) as engine:
        reply = await engine.reply("c", "hello there")
        history = await engine.history("c")
        assert blocked(engine, "output") == 1
    assert model.samples == [False, True]
    assert reply == SAFE_REPLY  # the sampled retry is what is sent and kept
    assert [(e.user, e.bot) for e in history] == [("hello there", SAFE_REPLY)]
    assert "zorblax" not in caplog.text and "hello there" not in caplog.text


async def test_when_the_retry_is_unsafe_too_the_user_gets_the_deflection_and_nothing_is_stored(tiny_model, settings):
    model = RewrittenModel(tiny_model, lambda text, sample: " Purple monkey!" if sample else " you zorblax")
    async with engine_for(model, settings) as engine:
        reply = await engine.reply("c", "hello there")
        assert reply == neutralize_mentions(DEFLECTION)
        assert await engine.history("c") == []
        assert blocked(engine, "output") == 2
        # The conversation goes on normally afterwards.
        model.rewrite = lambda text, sample: SAFE_REPLY
        assert await engine.reply("c", "hello again") == SAFE_REPLY
        assert [e.user for e in await engine.history("c")] == ["hello again"]


async def test_a_word_the_real_model_says_is_never_sent_once_block_listed(tiny_model, make_settings, tmp_path):
    # Find a prompt the tiny model answers with a real word, then block that word.
    for prompt in ("שלום", "```py\nprint(1)\n```", "hello", "what do you like?", "tell me about the ocean"):
        said = re.findall(r"[A-Za-z]{3,}", tiny_model.generate([[prompt]])[0].text)
        words = [w for w in said if w.lower() not in prompt.lower()]
        if words:
            break
    assert words, "the tiny model said no word at all"
    word = words[0]
    (tmp_path / "block.txt").write_text(word + "\n", encoding="utf-8")
    settings = make_settings(safety_blocklist=tmp_path / "block.txt")
    model = GatedModel(tiny_model)
    async with engine_for(model, settings) as engine:
        replies = [await engine.reply(f"c{i}", prompt) for i in range(5)]
        stored = [e.bot for i in range(5) for e in await engine.history(f"c{i}")]
    whole_word = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    assert not any(whole_word.search(text) for text in replies + stored)
    assert model.samples.count(True) == 5  # each greedy answer was refused and retried with sampling
