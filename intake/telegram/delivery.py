"""Results back into the chat, for the daemon's durable delivery queue.

``deliver`` turns the progress message into the result (a video, re-encoded smaller by
the shared encoder or sent as a link when over the upload limit; anything else as a
document), then sends the report, which notifies the user (an edit does not). Each step
is recorded in ``chat-delivery.json`` in the job directory; the result is an edit, so
redoing it after a crash between Telegram taking it and that record puts the same video
into the same message instead of sending a second one.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from telegram import Bot, InputMediaDocument, InputMediaVideo, Message
from telegram.error import BadRequest, Forbidden, NetworkError, TelegramError

from daemon import encoding, files, links
from daemon.config import Config
from daemon.jobs import JobError, JobOutcome, JobSpec, JobStatus
from daemon.logs import get_logger
from intake.telegram import texts
from intake.telegram.asks import Ask, reply, reply_to
from intake.telegram.progress import ProgressMessages

log = get_logger(component="chat")

DELIVERY_FILE = "chat-delivery.json"
SMALL_VIDEO = "video-small.mp4"
UPLOAD_TIMEOUT_S = 300.0  # a local Bot API server takes files up to 2 GB
READY_WAIT_S = 3.0  # a delivery waits this long for the bot to connect before retrying
# Why a progress message cannot take its last word: the user deleted it, or it can no
# longer be edited. The result itself goes as a new message on any failed edit.
_UNEDITABLE = ("message to edit not found", "message can't be edited",
               "message_edit_time_expired", "there is no media in the message to edit")
# The only Bad Requests after which a step is given up: the chat is gone. (Forbidden,
# a bot blocked or removed from the group, is given up too.)
_CHAT_GONE = ("chat not found", "chat_id is empty", "group chat was deactivated",
              "peer_id_invalid")


class ChatUnavailable(Exception):
    """Telegram (or the local Bot API server) did not take a delivery; it is retried."""


class Delivery:
    """Delivers finished chat jobs once the bot is ``ready`` (connected)."""

    def __init__(self, config: Config, bot: Bot, progress: ProgressMessages,
                 ready: asyncio.Event, redact: Callable[[str], str], upload_limit: int):
        self.config = config
        self.chat = config.intake.chat
        self.bot = bot
        self.progress = progress
        self.ready = ready
        self.redact = redact
        self.upload_limit = upload_limit

    async def deliver(self, spec: JobSpec, outcome: JobOutcome, directory: Path) -> None:
        """Answer a finished job in its chat. Every step is recorded when done and skipped
        when found done, so the delivery loop may call this again after a failure or a
        restart. A step Telegram took just before a crash, unrecorded, is done again:
        the result is an edit of the progress message, so it still arrives once."""
        try:  # just after a start, the bot may still be connecting
            await asyncio.wait_for(self.ready.wait(), READY_WAIT_S)
        except TimeoutError:
            raise ChatUnavailable("not connected to the Bot API yet") from None
        ask = Ask.of_job(spec)
        steps = _DeliverySteps(directory / DELIVERY_FILE, self.redact)
        async with self.progress.lock(spec.id):
            try:
                if outcome.status == JobStatus.done:
                    await steps.run("video", lambda: self._send_primary(spec, outcome,
                                                                        directory, ask))
                    if steps.done["video"].get("edited") is False:
                        # The result went as a new message: a progress message still
                        # there gets the last word instead of staying at its last percent.
                        await steps.run("progress", lambda: self._finish_progress(
                            spec, outcome, directory))
                    await steps.run("notice", lambda: self._send_notice(
                        spec, outcome, directory, ask, steps.done["video"].get("message_id")))
                else:
                    if outcome.status == JobStatus.failed:
                        await steps.run("failure", lambda: _message_id(reply(
                            self.bot, ask, texts.final(spec.id, outcome.status,
                                                       outcome.error))))
                    await steps.run("progress", lambda: self._finish_progress(spec, outcome,
                                                                              directory))
            except TelegramError as exc:
                raise ChatUnavailable(self.redact(str(exc))) from None
        await self.progress.forget(spec.id)

    async def _send_primary(self, spec: JobSpec, outcome: JobOutcome, directory: Path,
                            ask: Ask) -> dict[str, Any]:
        """The result, in place of the progress message: a video as a playable video,
        anything else as a document."""
        assert outcome.primary is not None
        path = directory / outcome.primary
        report = _read_report(directory)
        progress_id = await self.progress.message_id(spec.id, directory)
        if path.suffix.lower() == ".mp4":
            return await self._send_video(spec, ask, progress_id, path, report)
        if path.stat().st_size <= self.upload_limit:
            try:
                put = await self._put_file(ask, progress_id, path, InputMediaDocument,
                                           filename=path.name,
                                           caption=texts.caption(spec.id, report))
                return {**put, "sent_as": "upload"}
            except NetworkError as exc:
                if not _too_large(exc):
                    raise
        return await self._instead_of_upload(spec, ask, progress_id, path, report,
                                             self.upload_limit,
                                             "only videos are re-encoded smaller")

    async def _send_video(self, spec: JobSpec, ask: Ask, progress_id: int | None,
                          original: Path, report: dict[str, Any]) -> dict[str, Any]:
        """Over the upload limit: a link (with public_base_url), else a copy re-encoded
        to fit; the user is told which."""
        limit, path, note = self.upload_limit, original, ""
        while True:
            size = path.stat().st_size
            if size > limit:
                if self.chat.public_base_url:
                    return await self._instead_of_upload(spec, ask, progress_id, original,
                                                         report, limit, "")
                path = original.parent / SMALL_VIDEO
                try:
                    await asyncio.to_thread(shrink_to_fit, original, path, limit)
                except (JobError, encoding.FFmpegError) as exc:
                    return await self._instead_of_upload(spec, ask, progress_id, original,
                                                         report, limit, str(exc))
                size = path.stat().st_size
                note = texts.reencoded(size, limit, original.stat().st_size)
            info = await asyncio.to_thread(encoding.probe, path)
            try:
                put = await self._put_file(
                    ask, progress_id, path, InputMediaVideo, filename=f"{spec.id}.mp4",
                    duration=round(info.duration_s), width=info.width, height=info.height,
                    supports_streaming=True,
                    caption=texts.caption(spec.id, report, info.duration_s, note))
            except NetworkError as exc:
                if not _too_large(exc):
                    raise
                # The server takes less than max_upload_mb says: aim lower, and say so.
                log.warning("the Bot API refused the video as too large; lower "
                            "[intake.chat] max_upload_mb to what it accepts",
                            job_id=spec.id, size_mb=round(size / 1024**2, 2))
                limit = int(size * 0.8)
                continue
            return {**put, "bytes": size, "sent_as": "reencoded" if note else "upload"}

    async def _instead_of_upload(self, spec: JobSpec, ask: Ask, progress_id: int | None,
                                 path: Path, report: dict[str, Any], limit: int,
                                 why_not_smaller: str) -> dict[str, Any]:
        """A file too large to upload: a signed link when the HTTP API is public, else
        an apology that says why."""
        size = path.stat().st_size
        if self.chat.public_base_url:
            link = signed_file_link(self.config, spec.id, path.name)
            text = texts.link_instead(spec.id, report, link, size, limit,
                                      self.config.intake.http.link_ttl)
            return {**await self._put_text(ask, progress_id, text), "sent_as": "link"}
        text = texts.not_sent(spec.id, size, limit, why_not_smaller)
        return {**await self._put_text(ask, progress_id, text), "sent_as": "nothing"}

    async def _put_file(self, ask: Ask, progress_id: int | None, path: Path,
                        media: type[InputMediaVideo] | type[InputMediaDocument],
                        **fields: Any) -> dict[str, Any]:
        """Upload ``path`` into the progress message (see ``_into_progress``); ``fields``
        are what InputMediaVideo/Document and send_video/send_document both take."""

        async def edit(message_id: int) -> object:
            with open(path, "rb") as handle:
                return await self.bot.edit_message_media(
                    media(handle, **fields), chat_id=ask.chat_id, message_id=message_id,
                    read_timeout=UPLOAD_TIMEOUT_S)

        async def send() -> Message:
            upload = self.bot.send_video if media is InputMediaVideo else self.bot.send_document
            with open(path, "rb") as handle:
                return await upload(ask.chat_id, handle,
                                    reply_parameters=reply_to(ask.message_id),
                                    read_timeout=UPLOAD_TIMEOUT_S, **fields)

        return await self._into_progress(ask, progress_id, edit, send)

    async def _put_text(self, ask: Ask, progress_id: int | None, text: str) -> dict[str, Any]:
        """``text`` in place of the progress message's (see ``_into_progress``)."""
        return await self._into_progress(
            ask, progress_id,
            lambda message_id: self.bot.edit_message_text(text, chat_id=ask.chat_id,
                                                          message_id=message_id),
            lambda: reply(self.bot, ask, text))

    async def _into_progress(self, ask: Ask, progress_id: int | None,
                             edit: Callable[[int], Awaitable[object]],
                             send: Callable[[], Awaitable[Message]]) -> dict[str, Any]:
        """Put the result into the job's progress message with ``edit``. An edit is
        idempotent: done again after a crash (Telegram took it, the step was never
        recorded), it gives that one message the same content again, so the user still
        has one result. Without a progress message to edit, ``send`` sends the result as
        a new reply to the request."""
        if progress_id is not None:
            try:
                await edit(progress_id)
                return {"message_id": progress_id, "edited": True}
            except BadRequest as exc:
                reason = str(exc).lower()
                if "not modified" in reason:  # it has this content already: done before
                    return {"message_id": progress_id, "edited": True}
                if chat_gone(exc):  # a new message would not arrive either
                    raise
                log.info("the progress message cannot take the result; it goes as a new "
                         "message", chat_id=ask.chat_id, message_id=progress_id,
                         error=str(exc))
        # The progress message is gone (the user deleted it), cannot take the result (too
        # old to edit, an old Bot API server, any other refused edit) or was never
        # recorded (the daemon died between sending and recording it). This is the only
        # non-idempotent path left for a result: a crash after Telegram took the new
        # message, before the step is recorded, sends it a second time.
        return {"message_id": (await send()).message_id, "edited": False}

    async def _send_notice(self, spec: JobSpec, outcome: JobOutcome, directory: Path,
                           ask: Ask, result_id: int | None) -> dict[str, Any]:
        """A new message after the result, as a reply to it, because an edit notifies
        nobody: the HTML report as a document, or a short line when there is no report
        (or it is too large to upload). Unlike the result, this one can arrive twice if
        the daemon dies between Telegram taking it and the step being recorded."""
        reply_parameters = reply_to(result_id or ask.message_id)
        path = directory / "report.html"
        if "report.html" in outcome.reports and path.is_file() and \
                path.stat().st_size <= self.upload_limit:
            try:
                with open(path, "rb") as report:
                    sent = await self.bot.send_document(
                        ask.chat_id, report, filename=f"{spec.id}.report.html",
                        caption=texts.report_notice(spec.id),
                        reply_parameters=reply_parameters, read_timeout=UPLOAD_TIMEOUT_S)
                return {"message_id": sent.message_id, "sent_as": "report"}
            except NetworkError as exc:
                if not _too_large(exc):
                    raise
        sent = await self.bot.send_message(ask.chat_id, texts.done_notice(spec.id),
                                           reply_parameters=reply_parameters)
        return {"message_id": sent.message_id, "sent_as": "line"}

    async def _finish_progress(self, spec: JobSpec, outcome: JobOutcome, directory: Path
                               ) -> dict[str, Any]:
        """The last word of a job in its progress message, when the message did not
        become the result (failed, cancelled, or the result went as a new message)."""
        message_id = await self.progress.message_id(spec.id, directory)
        if message_id is None:  # never sent (the reply failed), or forgotten long ago
            return {"skipped": "no progress message"}
        try:
            await self.bot.edit_message_text(
                texts.final(spec.id, outcome.status, outcome.error),
                chat_id=spec.source.chat_id, message_id=message_id)
        except BadRequest as exc:  # deleted, or too old to edit: it keeps its last percent
            if not any(why in str(exc).lower() for why in _UNEDITABLE):
                raise
            return {"skipped": self.redact(str(exc))}
        return {"message_id": message_id}


class _DeliverySteps:
    """``chat-delivery.json``: the delivery steps already done for a job, and how."""

    def __init__(self, path: Path, redact: Callable[[str], str]):
        self.path = path
        self.redact = redact
        self.done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    async def run(self, name: str, send: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        if name in self.done:
            return
        try:
            result = await send()
        except BadRequest as exc:
            # "not modified": the message already says it. A chat that is gone will never
            # take it: don't retry that forever. Any other refusal is retried (the
            # delivery loop backs off), never dropped.
            if "not modified" in str(exc):
                result = {}
            elif chat_gone(exc):
                result = {"skipped": self.redact(str(exc))}
            else:
                raise
        except Forbidden as exc:  # the user blocked the bot, or it left the group
            result = {"skipped": self.redact(str(exc))}
        if "skipped" in result:
            log.warning("chat delivery step skipped", step=name, path=str(self.path.parent),
                        reason=result["skipped"])
        self.done[name] = result
        await asyncio.to_thread(files.write_json, self.path, self.done)


def shrink_to_fit(source: Path, dest: Path, limit_bytes: int) -> None:
    """A copy of ``source`` that fits in ``limit_bytes``, landed atomically at ``dest`` by
    the encoder the workers' ``max_mb`` uses (so it keeps the sound). A copy a previous
    attempt made is reused. Raises ``JobError`` or ``FFmpegError`` when it cannot fit."""
    if dest.exists() and dest.stat().st_size <= limit_bytes:
        return
    with tempfile.TemporaryDirectory(prefix="reelqueue-fit-") as scratch, \
            files.atomic_path(dest) as tmp:
        encoding.fit_to_size(source, tmp, limit_bytes, Path(scratch),
                             limit_name="the upload limit")


async def _message_id(sending: Awaitable[Message]) -> dict[str, Any]:
    return {"message_id": (await sending).message_id}


def chat_gone(exc: BadRequest) -> bool:
    """Whether Telegram refused because the chat itself no longer exists."""
    return any(why in str(exc).lower() for why in _CHAT_GONE)


def _too_large(exc: NetworkError) -> bool:
    text = str(exc).lower()
    return "too large" in text or "too big" in text


def _read_report(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def signed_file_link(config: Config, job_id: str, name: str) -> str:
    """A link to a job's file on the HTTP API that works without a token."""
    return links.file_link(links.link_key(config.state_dir), job_id, name,
                           config.intake.http.link_ttl, config.intake.chat.public_base_url)
