"""Live progress: each chat job has one progress message, edited as the worker reports,
at most every ``progress_interval``, until its delivery turns it into the result.

Redis keys: ``reelqueue:chat:job:<id>`` (hash: chat_id, progress_message_id) and
``reelqueue:chat:live`` (jobs whose progress message is still being edited). The
message's id is also kept in ``chat-progress.json`` in the job directory, for a delivery
after Redis forgot it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redis.exceptions import RedisError
from telegram import Bot
from telegram.error import BadRequest, TelegramError

from daemon import files
from daemon.jobs import JobStatus
from daemon.logs import get_logger
from daemon.queue import EVENTS_CHANNEL, JOB_EXPIRY_S, QueueClient
from intake.telegram import texts
from intake.telegram.settings import ChatIntakeConfig

log = get_logger(component="chat")

PREFIX = "reelqueue:chat:"
LIVE_KEY = PREFIX + "live"
PROGRESS_FILE = "chat-progress.json"
TICK_S = 0.2  # how often progress messages that are due an edit are looked at
SWEEP_S = 10.0  # every live progress message is re-read this often: queue positions
# move without an event of their own, and a pub/sub message can be missed.


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


@dataclass
class _Live:
    """A job whose progress message is still kept up to date."""

    chat_id: int
    message_id: int
    shown: str = ""  # the text the message has now
    next_edit: float = 0.0  # monotonic time before which it is not edited again


class ProgressMessages:
    """The progress messages of this daemon's chat jobs, and a lock per job that keeps
    an edit, a submission's bookkeeping and the delivery from crossing."""

    def __init__(self, chat: ChatIntakeConfig, queue: QueueClient, bot: Bot,
                 redact: Callable[[str], str]):
        self.chat = chat
        self.queue = queue
        self.redis = queue.redis
        self.bot = bot
        self.redact = redact
        self._live: dict[str, _Live] = {}
        self._dirty: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    async def track(self, job_id: str, chat_id: int, message_id: int, shown: str) -> None:
        # In memory first: this run keeps editing the message even if Redis is away now.
        self._live[job_id] = _Live(chat_id, message_id, shown,
                                   time.monotonic() + self.chat.progress_interval)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping={"chat_id": chat_id,
                                                "progress_message_id": message_id})
            pipe.expire(job_key(job_id), JOB_EXPIRY_S)
            pipe.sadd(LIVE_KEY, job_id)
            await pipe.execute()

    async def forget(self, job_id: str) -> None:
        """The job is delivered: its message is not edited any more."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(LIVE_KEY, job_id)
            pipe.delete(job_key(job_id))
            await pipe.execute()
        self._live.pop(job_id, None)
        self._dirty.discard(job_id)
        self._locks.pop(job_id, None)

    @staticmethod
    async def record_on_disk(directory: Path, message_id: int) -> None:
        """On disk beside the spec: the delivery turns this message into the result, and
        must find it even when Redis has forgotten it."""
        try:
            await asyncio.to_thread(files.write_json, directory / PROGRESS_FILE,
                                    {"message_id": message_id})
        except OSError as exc:  # a full disk: Redis (and this run's memory) still know it
            log.warning("could not record the progress message in the job directory",
                        path=str(directory), error=str(exc))

    async def message_id(self, job_id: str, directory: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((directory / PROGRESS_FILE).read_text())["message_id"])
        # Not on disk: the disk was full, or the job was queued before that file existed.
        if live := self._live.get(job_id):
            return live.message_id
        message_id = await self.redis.hget(job_key(job_id), "progress_message_id")
        return None if message_id is None else int(message_id)

    async def load_live(self) -> None:
        """After a restart: pick up the progress messages a previous run was editing."""
        for raw in await self.redis.smembers(LIVE_KEY):
            job_id = raw.decode()
            fields = await self.redis.hgetall(job_key(job_id))
            if not fields:
                await self.redis.srem(LIVE_KEY, job_id)
                continue
            self._live[job_id] = _Live(int(fields[b"chat_id"]),
                                       int(fields[b"progress_message_id"]))
            self._dirty.add(job_id)

    async def watch_events(self) -> None:
        """Mark chat jobs as changed when the worker publishes, and all of them now and
        then (see SWEEP_S)."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    swept = 0.0
                    while True:
                        if time.monotonic() - swept >= SWEEP_S:
                            self._dirty.update(self._live)
                            swept = time.monotonic()
                        event = await pubsub.get_message(ignore_subscribe_messages=True,
                                                         timeout=1.0)
                        if event is not None:
                            job_id = json.loads(event["data"]).get("id")
                            if job_id in self._live:
                                self._dirty.add(job_id)
            except (RedisError, OSError) as exc:
                log.warning("lost the progress events; resubscribing", error=str(exc))
                await asyncio.sleep(1)

    async def keep_current(self) -> None:
        """Edit each changed progress message, at most once per progress_interval."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            due = [job_id for job_id in self._dirty
                   if job_id not in self._live or self._live[job_id].next_edit <= now]
            for job_id in due:
                self._dirty.discard(job_id)
                try:
                    await self._edit(job_id)
                except Exception as exc:  # Redis away, or a bug: keep the other jobs going
                    log.warning("could not update a progress message", job_id=job_id,
                                error=self.redact(repr(exc)))
                    if live := self._live.get(job_id):
                        live.next_edit = now + self.chat.progress_interval
                        self._dirty.add(job_id)

    async def _edit(self, job_id: str) -> None:
        async with self.lock(job_id):
            live = self._live.get(job_id)
            if live is None:  # delivered meanwhile
                return
            state = await self.queue.get_state(job_id)
            if state is None or JobStatus(state["status"]).finished:
                return  # delivery writes the last word
            text = texts.progress(job_id, state)
            if text == live.shown:
                return
            try:
                await self.bot.edit_message_text(text, chat_id=live.chat_id,
                                                 message_id=live.message_id)
                live.shown = text
            except BadRequest as exc:
                if "not modified" in str(exc):
                    live.shown = text
                else:  # e.g. the user deleted the message: stop editing it
                    log.info("stopped editing a progress message", job_id=job_id,
                             error=str(exc))
                    self._live.pop(job_id, None)
            except TelegramError as exc:  # down, or limited even after the rate limiter's
                log.debug("progress edit failed; trying again later", job_id=job_id,
                          error=self.redact(str(exc)))
                self._dirty.add(job_id)
            # Counted from the end of this edit: even after a slow answer, the next edit
            # reaches Telegram a full interval after this one.
            live.next_edit = time.monotonic() + self.chat.progress_interval
