"""Submitting from the chat: a message (and its attachment, fetched once the request
has passed its checks) becomes a request for ``daemon.submit``; the answer is the
progress message, or why nothing was queued."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from telegram import Bot, Message
from telegram.error import TelegramError

from daemon import files, links
from daemon.config import Config
from daemon.jobs import Channel, JobError, JobStatus, Source, derive_job_id, job_dir
from daemon.logs import get_logger
from daemon.submit import Limits, Refusal, Refused, Request, Submitter, Upload
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


class Submissions:
    """Turns chat requests into queued jobs, each with its progress message."""

    def __init__(self, config: Config, submitter: Submitter, bot: Bot,
                 progress: ProgressMessages, redact: Callable[[str], str], upload_limit: int,
                 commands: dict[str, str]):
        self.chat = config.intake.chat
        self.submitter = submitter
        self.bot = bot
        self.progress = progress
        self.redact = redact
        self.upload_limit = upload_limit
        self.commands = commands  # command → job kind: /longexposure → long_exposure
        self.limits = Limits(self.chat.max_queued_per_user,
                             self.chat.max_jobs_per_user_per_day, self.chat.max_prompt_chars)

    async def submit_message(self, ask: Ask, command: str, prompt: str, message: Message
                             ) -> None:
        """A job of the kind ``command`` names, with the message's attachment if any."""
        kind = self.commands[command]
        attachment = attachment_of(message)
        if not prompt and attachment is None:
            takes_files = bool(self.submitter.kinds.inputs(kind))
            await reply(self.bot, ask, texts.usage(command, takes_files=takes_files))
            return
        await self.submit(ask, kind, prompt, attachment=attachment)

    async def submit(self, ask: Ask, kind: str, prompt: str, *,
                     options: dict[str, Any] | None = None,
                     attachment: Attachment | None = None, job_id: str | None = None) -> None:
        """Submit, and answer with the progress message (or why not)."""
        # Deterministic: a message seen twice (an update fetched again after a crash, a
        # second Render) is one job.
        job_id = job_id or derive_job_id("telegram", str(ask.chat_id), str(ask.message_id))
        inputs = (Upload(attachment.name, partial(self._download, attachment)),) \
            if attachment else ()
        request = Request(kind=kind, prompt=prompt, options=options or {},
                          source=Source(channel=Channel.chat, chat_id=ask.chat_id,
                                        message_id=ask.message_id),
                          submitted_by=ask.submitter, inputs=inputs, job_id=job_id,
                          limits=self.limits)
        # Held until the progress message is recorded: a job quick enough to finish first
        # is delivered after that, so its progress message gets its last word too.
        async with self.progress.lock(job_id):
            answer = await self.submitter.submit(request)
            if isinstance(answer, Refused):
                await reply(self.bot, ask, texts.not_queued(_in_chat_words(answer)))
                return
            if answer.duplicate:
                await reply(self.bot, ask, texts.already_queued(job_id))
                return
            text = texts.progress(job_id, {"status": JobStatus.queued,
                                           "position": answer.position})
            sent = await reply(self.bot, ask, text)
            await self.progress.record_on_disk(job_dir(self.submitter.jobs_dir, job_id),
                                               sent.message_id)
            try:
                await self.progress.track(job_id, ask.chat_id, sent.message_id, text)
            except RedisError as exc:  # queued and answered: only the bookkeeping is lost
                log.warning("redis unavailable after queueing a chat job", job_id=job_id,
                            error=str(exc))
        log.info("job queued", job_id=job_id, kind=kind, user_id=ask.user_id,
                 chat_id=ask.chat_id, position=answer.position)

    async def _download(self, attachment: Attachment, dest: Path) -> None:
        """Fetch an attached file to ``dest`` in the job's inputs, checking its size
        first."""
        if attachment.size is not None and attachment.size > self.upload_limit:
            raise JobError(texts.attachment_too_large(attachment.size, self.upload_limit))
        try:
            remote = await self.bot.get_file(attachment.file_id)
            if remote.file_size is not None and remote.file_size > self.upload_limit:
                raise JobError(texts.attachment_too_large(remote.file_size,
                                                          self.upload_limit))
            with files.atomic_path(dest) as tmp:
                await remote.download_to_drive(tmp)
        except TelegramError as exc:
            raise JobError(f"Telegram did not hand over the file: {self.redact(str(exc))}"
                           ) from None


def _in_chat_words(refused: Refused) -> str:
    """The caps, worded for a chat (with the commands that help); the rest as is."""
    if refused.why == Refusal.queued_cap:
        return texts.queued_cap(refused.count, refused.limit)
    if refused.why == Refusal.daily_cap:
        return texts.daily_cap(refused.limit, refused.retry_after_s or 0)
    return refused.message
