"""The chat outbox: messages other processes leave in Redis for the bot to post (the
morning digest's summary), sent with the reliable-queue pattern: a message leaves Redis
only once it was sent."""

from __future__ import annotations

import asyncio
import html
import json
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError
from telegram import Bot
from telegram.error import NetworkError, RetryAfter, TelegramError

from daemon.logs import get_logger
from daemon.queue import CHAT_OUTBOX_KEY

log = get_logger(component="chat")

ACTIVE_KEY = CHAT_OUTBOX_KEY + ":active"  # what is being sent now


class ChatOutbox:
    def __init__(self, redis: Redis, bot: Bot, redact: Callable[[str], str]):
        self.redis = redis
        self.bot = bot
        self.redact = redact

    async def send_forever(self) -> None:
        while True:
            try:
                await self._drain()
            except RedisError as exc:
                log.warning("redis unavailable for the chat outbox; retrying", error=str(exc))
                await asyncio.sleep(1)

    async def _drain(self) -> None:
        # What a crashed daemon (or this one, before Redis went away) was sending goes
        # out again: nothing else in this process sends from the outbox meanwhile.
        while await self.redis.lmove(ACTIVE_KEY, CHAT_OUTBOX_KEY, "RIGHT", "LEFT"):
            pass
        delay = 1.0
        while True:
            raw = await self.redis.blmove(CHAT_OUTBOX_KEY, ACTIVE_KEY, 5, "RIGHT", "LEFT")
            if raw is None:
                continue
            item = json.loads(raw)
            try:
                await self.bot.send_message(item["chat_id"], html.escape(item["text"]))
            except (NetworkError, RetryAfter) as exc:  # TimedOut is a NetworkError
                log.warning("could not post to the chat; retrying", error=self.redact(str(exc)),
                            retry_in_s=delay)
                await self.redis.lmove(ACTIVE_KEY, CHAT_OUTBOX_KEY, "LEFT", "RIGHT")
                await asyncio.sleep(delay)
                delay = min(300.0, delay * 2)
                continue
            except TelegramError as exc:  # the chat is gone or refuses the bot: drop it
                log.error("the chat refused a message; dropped", chat_id=item["chat_id"],
                          error=self.redact(str(exc)))
            delay = 1.0
            await self.redis.lrem(ACTIVE_KEY, 1, raw)
