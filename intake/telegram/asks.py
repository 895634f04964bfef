"""Who asked for what, and answering them in their chat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from telegram import Bot, Message, ReplyParameters

from daemon.jobs import JobSpec


@dataclass(frozen=True)
class Ask:
    """Who asked, in which chat, and the message that asked (answers reply to it)."""

    user_id: int
    chat_id: int
    message_id: int

    @classmethod
    def of_job(cls, spec: JobSpec) -> Ask:
        assert spec.source.chat_id is not None and spec.source.message_id is not None
        return cls(int(spec.submitted_by.removeprefix("tg:")), spec.source.chat_id,
                   spec.source.message_id)

    @property
    def submitter(self) -> str:
        return f"tg:{self.user_id}"


def reply_to(message_id: int) -> ReplyParameters:
    # The request may have been deleted meanwhile: then answer without quoting it.
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


async def reply(bot: Bot, ask: Ask, text: str, **kwargs: Any) -> Message:
    """``text`` in the asker's chat, as a reply to their request."""
    return await bot.send_message(ask.chat_id, text, reply_parameters=reply_to(ask.message_id),
                                  **kwargs)
