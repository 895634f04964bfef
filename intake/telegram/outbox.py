"""Posting what other processes leave in the chat's outbox (``daemon.outbox``): the
morning digest's summary, to the chat its address names."""

from __future__ import annotations

import html
from collections.abc import Callable

from redis.asyncio import Redis
from telegram import Bot
from telegram.error import NetworkError, RetryAfter

from daemon.jobs import Channel
from daemon.outbox import Outbox, PostLater


def chat_outbox(redis: Redis, bot: Bot, redact: Callable[[str], str]) -> Outbox:
    async def post(to: str, text: str) -> None:
        try:
            await bot.send_message(int(to), html.escape(text))
        except (NetworkError, RetryAfter) as exc:  # TimedOut is a NetworkError
            raise PostLater(str(exc)) from exc

    return Outbox(redis, Channel.chat, post, redact)
