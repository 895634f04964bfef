"""Messages other processes leave for a channel to post (the morning digest's summary):
one durable list per channel in Redis, ``reelqueue:<channel>:outbox``. The channel
posts them with the reliable-queue pattern, so a message leaves Redis only once it was
posted, and a daemon that dies mid-post posts it again on its next start."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from daemon.logs import get_logger
from daemon.schedule import PREFIX

log = get_logger(component="outbox")

MAX_BACKOFF_S = 300.0


def outbox_key(channel: str) -> str:
    return f"{PREFIX}{channel}:outbox"


async def leave(redis: Redis, channel: str, to: str, text: str) -> None:
    """Leave ``text`` for ``channel`` to post to ``to`` (an address in its own terms)."""
    await redis.lpush(outbox_key(channel), json.dumps({"to": to, "text": text}))


class PostLater(Exception):
    """The channel could not post now (its server is away): try the message again."""


Post = Callable[[str, str], Awaitable[None]]  # (to, text); raises PostLater to retry


class Outbox:
    """One channel's outbox, posted by ``post``. Any other error than ``PostLater``
    (the address is gone, the server refuses) drops that message with an error log."""

    def __init__(self, redis: Redis, channel: str, post: Post,
                 redact: Callable[[str], str] = str):
        self.redis = redis
        self.channel = channel
        self.key = outbox_key(channel)
        self.active = self.key + ":active"  # what is being posted now
        self.post = post
        self.redact = redact

    async def post_forever(self) -> None:
        while True:
            try:
                await self._drain()
            except RedisError as exc:
                log.warning("redis unavailable for the outbox; retrying",
                            channel=self.channel, error=str(exc))
                await asyncio.sleep(1)

    async def _drain(self) -> None:
        # What a crashed daemon (or this one, before Redis went away) was posting goes
        # out again: nothing else in this process posts from this outbox meanwhile.
        while await self.redis.lmove(self.active, self.key, "RIGHT", "LEFT"):
            pass
        delay = 1.0
        while True:
            raw = await self.redis.blmove(self.key, self.active, 5, "RIGHT", "LEFT")
            if raw is None:
                continue
            try:
                item = json.loads(raw)
                await self.post(str(item["to"]), item["text"])
            except PostLater as exc:
                log.warning("could not post; retrying", channel=self.channel,
                            error=self.redact(str(exc)), retry_in_s=delay)
                await self.redis.lmove(self.active, self.key, "LEFT", "RIGHT")
                await asyncio.sleep(delay)
                delay = min(MAX_BACKOFF_S, delay * 2)
                continue
            except Exception as exc:  # not a message, or refused for good: drop that one
                log.error("a message could not be posted; dropped", channel=self.channel,
                          message=raw[:200], error=self.redact(str(exc)))
            delay = 1.0
            await self.redis.lrem(self.active, 1, raw)
