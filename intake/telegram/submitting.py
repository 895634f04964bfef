"""Submitting from the chat: check a request (prompt length, the user's caps, the job's
options), fetch its attachment, write the spec, queue it, and answer with the progress
message.

Redis key: ``reelqueue:chat:daily:<user>:<UTC date>`` (through the queue's counters).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from telegram import Bot, Message
from telegram.error import TelegramError

from daemon import files, links
from daemon.config import Config
from daemon.jobs import (
    Channel,
    JobError,
    JobSpec,
    JobStatus,
    Source,
    derive_job_id,
    job_dir,
    read_spec,
    validate_request,
    write_spec,
)
from daemon.logs import get_logger
from daemon.queue import QueueClient, QueueFull, seconds_to_utc_midnight
from intake.telegram import texts
from intake.telegram.asks import Ask, reply
from intake.telegram.progress import ProgressMessages

log = get_logger(component="chat")


@dataclass(frozen=True)
class Attachment:
    file_id: str
    name: str
    size: int | None  # as Telegram announced it; None when it did not say


def attachment_of(message: Message) -> Attachment | None:
    if message.photo:
        largest = message.photo[-1]
        return Attachment(largest.file_id, "photo.jpg", largest.file_size)
    for media, default in ((message.video, "video.mp4"), (message.document, "file")):
        if media is not None:
            name = links.safe_filename(getattr(media, "file_name", None) or default)
            return Attachment(media.file_id, name, media.file_size)
    return None


def job_inputs(kind: str) -> tuple[str, ...]:
    """The file suffixes a job kind takes (none: text only). Loads the kind's module, so
    only asked when needed, not for every kind at start."""
    from workers import pipelines

    return tuple(pipelines.load(kind).INPUTS)


class Submissions:
    """Turns chat requests into queued jobs, each with its progress message."""

    def __init__(self, config: Config, queue: QueueClient, bot: Bot,
                 progress: ProgressMessages, redact: Callable[[str], str], upload_limit: int,
                 kinds: dict[str, str]):
        self.config = config
        self.chat = config.intake.chat
        self.queue = queue
        self.redis = queue.redis
        self.bot = bot
        self.progress = progress
        self.redact = redact
        self.upload_limit = upload_limit
        self.kinds = kinds  # command → job kind: /longexposure → long_exposure

    async def submit_message(self, ask: Ask, command: str, prompt: str, message: Message
                             ) -> None:
        """A job of the kind ``command`` names, with the message's attachment if any."""
        kind = self.kinds[command]
        attachment = attachment_of(message)
        if not prompt and attachment is None:
            await reply(self.bot, ask, texts.usage(command, takes_files=bool(job_inputs(kind))))
            return
        await self.submit(ask, kind, prompt, attachment=attachment)

    async def submit(self, ask: Ask, kind: str, prompt: str, *,
                     options: dict[str, Any] | None = None,
                     attachment: Attachment | None = None, job_id: str | None = None) -> None:
        """Check, queue, and answer with the progress message."""
        # Deterministic: a message seen twice (an update fetched again after a crash) is
        # one job.
        job_id = job_id or derive_job_id("telegram", str(ask.chat_id), str(ask.message_id))
        directory = job_dir(self.config.jobs_dir, job_id)
        if (directory / "spec.json").exists():
            # Seen before: the same update fetched again after a crash, or a second
            # Render. The enqueue below says whether it is queued already, and queues it
            # if that first attempt died between writing the spec and queueing it.
            spec = await asyncio.to_thread(read_spec, self.config.jobs_dir, job_id)
        else:
            inputs = [attachment.name] if attachment else []
            try:
                self.check_prompt(prompt)
                await self._check_caps(ask.user_id)
                options = validate_request(kind, prompt, options or {}, inputs)
                if attachment is not None:
                    await self._download(attachment, directory / "inputs")
            except JobError as exc:
                shutil.rmtree(directory, ignore_errors=True)  # a partial download; no spec yet
                await reply(self.bot, ask, texts.not_queued(str(exc)))
                return
            spec = JobSpec(id=job_id, kind=kind, prompt=prompt, options=options, inputs=inputs,
                           source=Source(channel=Channel.chat, chat_id=ask.chat_id,
                                         message_id=ask.message_id),
                           submitted_by=ask.submitter)
            # With Redis down, fail here (on_error answers) rather than leave a spec behind.
            # Only Redis dying between this and the enqueue leaves one: a job that is
            # queued runs as usual; one that is not is never run, and this message's
            # update, fetched again, queues it.
            await self.redis.ping()
            await asyncio.to_thread(write_spec, self.config.jobs_dir, spec)
        # Held until the progress message is recorded: a job quick enough to finish first
        # is delivered after that, so its progress message gets its last word too.
        async with self.progress.lock(job_id):
            try:
                result = await self.queue.enqueue(spec)
            except QueueFull as exc:
                shutil.rmtree(directory, ignore_errors=True)
                await reply(self.bot, ask, texts.not_queued(str(exc)))
                return
            if not result.accepted:
                await reply(self.bot, ask, texts.already_queued(job_id))
                return
            text = texts.progress(job_id, {"status": JobStatus.queued,
                                           "position": result.position})
            sent = await reply(self.bot, ask, text)
            await self.progress.record_on_disk(directory, sent.message_id)
            try:
                await self.queue.count_today(ask.submitter)
                await self.progress.track(job_id, ask.chat_id, sent.message_id, text)
            except RedisError as exc:  # queued and answered: only the bookkeeping is lost
                log.warning("redis unavailable after queueing a chat job", job_id=job_id,
                            error=str(exc))
        log.info("job queued", job_id=job_id, kind=kind, user_id=ask.user_id,
                 chat_id=ask.chat_id, position=result.position)

    def check_prompt(self, prompt: str) -> None:
        if len(prompt) > self.chat.max_prompt_chars:
            raise JobError(texts.prompt_too_long(len(prompt), self.chat.max_prompt_chars))

    async def _check_caps(self, user_id: int) -> None:
        """The per-user caps; 0 means no cap."""
        submitter = f"tg:{user_id}"
        cap = self.chat.max_queued_per_user
        if cap:
            active = await self.queue.active_jobs(submitter)
            if len(active) >= cap:
                raise JobError(texts.queued_cap(len(active), cap))
        cap = self.chat.max_jobs_per_user_per_day
        if cap and await self.queue.jobs_today(submitter) >= cap:
            raise JobError(texts.daily_cap(cap, seconds_to_utc_midnight()))

    async def _download(self, attachment: Attachment, inputs: Path) -> None:
        """Fetch an attached file into the job's inputs, checking its size first."""
        if attachment.size is not None and attachment.size > self.upload_limit:
            raise JobError(texts.attachment_too_large(attachment.size, self.upload_limit))
        try:
            remote = await self.bot.get_file(attachment.file_id)
            if remote.file_size is not None and remote.file_size > self.upload_limit:
                raise JobError(texts.attachment_too_large(remote.file_size,
                                                          self.upload_limit))
            with files.atomic_path(inputs / attachment.name) as tmp:
                await remote.download_to_drive(tmp)
        except TelegramError as exc:
            raise JobError(f"Telegram did not hand over the file: {self.redact(str(exc))}"
                           ) from None
