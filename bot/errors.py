"""Expected failures of a reply, each with a short message fit to show a user.

Adapters catch `ReplyError` and send `error.user_message`; anything else is a
bug: it is logged with its traceback and the user gets a generic apology.
"""

from __future__ import annotations


class ReplyError(Exception):
    """A reply that cannot be given, for a reason the user may be told."""

    user_message = "Sorry, something went wrong on my side. Please try again."
    outcome = "error"  # the metrics label for this failure

    def __init__(self, user_message: str | None = None) -> None:
        if user_message is not None:
            self.user_message = user_message
        super().__init__(self.user_message)


class EmptyMessage(ReplyError):
    user_message = "I didn't catch that: your message was empty. Write something and I'll answer."
    outcome = "empty"


class MessageTooLong(ReplyError):
    outcome = "too_long"

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            f"That message is too long for me ({length:,} characters). "
            f"Please keep it to at most {limit:,} characters."
        )
        self.length = length
        self.limit = limit


class EngineBusy(ReplyError):
    user_message = "I'm busy with a lot of conversations right now. Please try again shortly."
    outcome = "busy"
    retry_after: float = 5
    notify = True

    def __init__(
        self, user_message: str | None = None, *, retry_after: float | None = None, notify: bool = True
    ) -> None:
        super().__init__(user_message)
        if retry_after is not None:
            self.retry_after = retry_after
        self.notify = notify  # False: adapters stay silent (a flood already got its notice)


class ConversationBusy(ReplyError):
    """Too many messages of this conversation are already waiting for their answer
    (CONVERSATION_QUEUE_SIZE): one busy channel must not take the whole queue."""

    user_message = (
        "I'm still answering the earlier messages here. Please wait for my answers, then ask again."
    )
    outcome = "conversation_busy"

    def __init__(self, retry_after: float, *, notify: bool = True) -> None:
        super().__init__()
        self.retry_after = retry_after
        self.notify = notify  # False after the first refusal of a flood: adapters stay silent


class EngineClosed(EngineBusy):
    user_message = "I'm restarting right now. Please try again in a minute."
    outcome = "closed"


class ReplyTimeout(ReplyError):
    user_message = "Sorry, I took too long to think of an answer. Please try again."
    outcome = "timeout"


class GenerationFailed(ReplyError):
    user_message = "Sorry, something went wrong while I was thinking. Please try again."
    outcome = "model_error"


class RateLimited(ReplyError):
    """Over the per-user limit. `notify` is False for messages after the first
    notice, which adapters answer with silence."""

    outcome = "rate_limited"

    def __init__(self, retry_after: float, *, notify: bool) -> None:
        seconds = max(1, round(retry_after))
        super().__init__(f"You're sending messages faster than I can answer. Try again in {seconds}s.")
        self.retry_after = retry_after
        self.notify = notify


class UserBlocked(ReplyError):
    """The operator blocked this user: adapters stay silent."""

    user_message = ""
    outcome = "blocked_user"
    notify = False


class CannotRetry(ReplyError):
    """"Try again" cannot redo that answer; `user_message` says why. The answer
    shown stays as it is."""

    outcome = "cannot_retry"


class NotLatest(CannotRetry):
    user_message = "I can only redo my latest answer in this conversation."
    outcome = "not_latest"


class AnswerGone(CannotRetry):
    user_message = "I no longer remember that answer (it was redone or forgotten), so I can't redo it."
    outcome = "answer_gone"


class NoOtherAnswer(CannotRetry):
    user_message = "I couldn't come up with a different answer this time. Please try again."
    outcome = "no_other_answer"


class MemoryUnavailable(CannotRetry):
    user_message = "I can't redo answers right now: my memory is unavailable. Please try again later."
    outcome = "memory_unavailable"
    retry_after: float = 30


class PersonaRefused(ValueError):
    """A persona that cannot be used; `str(error)` says why and what to change."""
