"""The benchmark's conversations: fresh one-line ones, and ones with a history
that fills BlenderBot's 128-token window, as real conversations do after two
or three exchanges.

A conversation is its turns, oldest first, the newest user message last,
exactly what the engine builds from its memory (the user's messages and the
bot's replies as decoded, with their leading space). Every contender encodes
them with bot.prompt, so all see the same input ids; the engine contender is
given the history through its memory, the way a real conversation reaches it.
"""

from __future__ import annotations

NEW_TOKENS = 32  # every reply: min = max new tokens

BASE_PROMPTS = [
    "Hello there, how are you doing today?",
    "I just got back from a long walk with my dog. What did you do this weekend?",
    "What is your favourite food? Mine is pizza with lots of cheese.",
    "Do you have any pets?",
    "I like to read books and play the guitar with my friends. What about you?",
    "The weather is nice today, let us go for a walk in the park!",
    "Tell me something interesting about the ocean.",
    "I am thinking about learning to cook. Any advice for a beginner?",
    "My favourite band is playing in town next week and I cannot wait.",
    "What kind of music do you listen to when you work?",
    "I have been trying to get up earlier in the morning but it is so hard.",
    "Have you ever been to the mountains? I went hiking there last summer.",
    "Which do you prefer, coffee or tea?",
    "I started a new job on Monday and everyone has been really friendly.",
    "What would you do with a whole free day and no plans at all?",
    "My sister just had a baby, so I am an aunt now!",
]

# Replies as BlenderBot gives them (decoded with their leading space).
BOT_REPLIES = [
    " I'm doing well, thanks for asking. I just got home from work. How about you?",
    " That sounds like a lot of fun. I love going for walks, especially when the weather is nice out.",
    " I love pizza too! What kind of toppings do you like on yours? I like pepperoni and mushrooms.",
    " I have a cat named Whiskers. She is very lazy but I love her very much. Do you have any pets?",
    " I like to play video games and read. I'm reading a really good fantasy novel right now.",
    " I've never been, but I would love to go someday. What was your favorite part of the trip?",
    " Coffee for sure. I can't start my day without it. Do you drink it black or with milk?",
    " Congratulations! That's so exciting. What do you do for a living, if you don't mind me asking?",
]


def prompts(count: int) -> list[str]:
    """`count` distinct prompts of varied length, the same on every run."""
    out = []
    for i in range(count):
        text = BASE_PROMPTS[i % len(BASE_PROMPTS)]
        for round_ in range(i // len(BASE_PROMPTS)):
            text += " " + BASE_PROMPTS[(i * 7 + 3 + round_) % len(BASE_PROMPTS)]
        out.append(text)
    return out


def short_conversations(count: int) -> list[list[str]]:
    """Fresh conversations: one message each, 5-40 tokens."""
    return [[prompt] for prompt in prompts(count)]


def full_window_conversations(count: int) -> list[list[str]]:
    """Conversations of four exchanges and a new message, each different: about
    150-200 tokens, so the engine's input is a full 128-token window (cut from
    the left, the newest message kept)."""
    conversations = []
    for i in range(count):
        turns = []
        for exchange in range(4):
            turns.append(BASE_PROMPTS[(i + 3 * exchange) % len(BASE_PROMPTS)])
            turns.append(BOT_REPLIES[(i + exchange) % len(BOT_REPLIES)])
        turns.append(BASE_PROMPTS[(i * 5 + 1) % len(BASE_PROMPTS)])
        conversations.append(turns)
    return conversations


WORKLOADS = {"short": short_conversations, "full": full_window_conversations}
