"""`blender-chat chat`: the terminal REPL, against the same engine and memory."""

from __future__ import annotations

import subprocess
import sys

from conftest import subprocess_env


def chat(tmp_path, blenderbot_dir, stdin: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(
        BLENDERBOT_MODEL=str(blenderbot_dir),
        BLENDERBOT_MAX_NEW_TOKENS="6",
        BLENDERBOT_NUM_BEAMS="1",
        MEMORY_URL=f"sqlite:///{tmp_path}/memory.db",
        **({"LOG_LEVEL": "WARNING"} | env),
    )
    return subprocess.run(
        [sys.executable, "-m", "bot", "chat", *args],
        input=stdin, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def bot_lines(output: str) -> list[str]:
    return [line.split("bot> ", 1)[1] for line in output.splitlines() if "bot> " in line]


def test_chat_answers_remembers_across_restarts_and_resets(tmp_path, blenderbot_dir):
    first = chat(tmp_path, blenderbot_dir, "Hello bot!\nHow are you?\n/quit\n", "--conversation", "mine")
    assert first.returncode == 0, first.stderr
    answers = bot_lines(first.stdout)
    assert len(answers) == 2 and all(a.strip() for a in answers)

    second = chat(tmp_path, blenderbot_dir, "", "--conversation", "mine")  # Ctrl-D at once
    assert second.returncode == 0
    assert "2 earlier exchanges remembered" in second.stdout
    # Where it left off, as it was shown.
    resumed = second.stdout.split("remembered", 1)[1].splitlines()[1:5]
    assert resumed == ["you> Hello bot!", f"bot> {answers[0]}", "you> How are you?", f"bot> {answers[1]}"]

    other = chat(tmp_path, blenderbot_dir, "/quit\n", "--conversation", "someone-else")
    assert "earlier exchange" not in other.stdout

    reset = chat(tmp_path, blenderbot_dir, "/reset\n/quit\n", "--conversation", "mine")
    assert "(conversation forgotten)" in reset.stdout
    after = chat(tmp_path, blenderbot_dir, "/quit\n", "--conversation", "mine")
    assert "earlier exchange" not in after.stdout


def test_empty_lines_are_ignored_and_bad_input_gets_a_message(tmp_path, blenderbot_dir):
    result = chat(tmp_path, blenderbot_dir, "\n   \n" + "x" * 3000 + "\n")
    assert result.returncode == 0
    assert bot_lines(result.stdout) == ["That message is too long for me (3,000 characters). Please keep it to at most 2,000 characters."]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_memory_file_that_is_not_a_database_is_one_line_not_a_traceback(tmp_path, blenderbot_dir):
    (tmp_path / "memory.db").write_text("these are my notes, not a database\n" * 100)
    result = chat(tmp_path, blenderbot_dir, "hello\n")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "the memory store (sqlite:///" in result.stderr and "could not be opened" in result.stderr
    assert (tmp_path / "memory.db").read_text().startswith("these are my notes")  # nothing lost


def test_resuming_a_long_conversation_shows_its_last_three_exchanges(tmp_path, blenderbot_dir):
    said = [f"message number {n}" for n in range(1, 6)]
    assert chat(tmp_path, blenderbot_dir, "\n".join(said) + "\n", "--conversation", "long").returncode == 0
    resumed = chat(tmp_path, blenderbot_dir, "", "--conversation", "long")
    assert "5 earlier exchanges remembered; the last 3" in resumed.stdout
    shown = [line.removeprefix("you> ") for line in resumed.stdout.splitlines() if line.startswith("you> message")]
    assert shown == said[-3:]


def test_the_terminal_shows_no_info_log_lines_while_chatting(tmp_path, blenderbot_dir):
    result = chat(tmp_path, blenderbot_dir, "Hello bot!\n/quit\n", LOG_LEVEL="INFO")
    assert result.returncode == 0, result.stderr
    assert f"Loading {blenderbot_dir} ..." in result.stdout  # the wait is explained, without the log
    assert " INFO " not in result.stdout + result.stderr
    assert len(bot_lines(result.stdout)) == 1
