"""The chat channel: a Telegram bot (python-telegram-bot v22) in the daemon's event loop.

- Updates arrive by long polling against ``[intake.chat] base_url``: Telegram's cloud,
  or a self-hosted Bot API server that keeps chat traffic inside the building.
- ``/video <prompt>`` (or any text in a private chat) queues a job and answers with one
  progress message, edited as the worker reports, at most every ``progress_interval``.
- ``/storyboard <prompt>`` plans the scenes at once, without GPU time; replying
  ``render`` to it (or pressing Render) queues a video of exactly those scenes.
- Results go back through the daemon's durable delivery queue: ``deliver`` turns the
  progress message into the video (re-encoded smaller, or a link, when over the upload
  limit), then sends the report, which notifies the user (an edit does not). Each step
  is recorded in ``chat-delivery.json`` in the job directory; the result is an edit, so
  redoing it after a crash between Telegram taking it and that record puts the same
  video into the same message instead of sending a second one.

Only allowlisted users (and, in groups, allowlisted groups) are served; others get one
polite refusal, and the log names their ids. The bot token never reaches a log.

Redis keys, under ``reelqueue:chat:``: ``job:<id>`` (hash: chat_id, progress_message_id),
``live`` (jobs whose progress message is still being edited), ``storyboard:<chat>:<msg>``,
``daily:<user>:<UTC date>`` and ``refused:<user>:<chat>``. The progress message's id is
also kept in ``chat-progress.json`` in the job directory, for a delivery after Redis
forgot it.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
import shutil
import subprocess
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import imageio_ffmpeg
from redis.exceptions import RedisError
from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaDocument,
    InputMediaVideo,
    Message,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatType, ParseMode
from telegram.error import (
    BadRequest,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    ContextTypes,
    Defaults,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBDeprecationWarning

from daemon import files, links
from daemon.config import Config
from daemon.jobs import (
    Channel,
    JobError,
    JobOutcome,
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
from daemon.queue import (
    CHAT_OUTBOX_KEY,
    EVENTS_CHANNEL,
    JOB_EXPIRY_S,
    QueueClient,
    QueueFull,
    recent_key,
    seconds_to_utc_midnight,
)
from intake import chat_format as texts

# python-telegram-bot 22 warns about its own coming timedelta change on every 429 it
# handles inside its rate limiter: a note about PTB's internals, not about this code.
warnings.filterwarnings("ignore", category=PTBDeprecationWarning)

log = get_logger(component="chat")

PREFIX = "reelqueue:chat:"
LIVE_KEY = PREFIX + "live"
DELIVERY_FILE = "chat-delivery.json"
PROGRESS_FILE = "chat-progress.json"
SMALL_VIDEO = "video-small.mp4"
POLL_TIMEOUT_S = 10  # how long the Bot API server holds a getUpdates call open
RATE_LIMIT_RETRIES = 3  # a 429 is retried after its retry_after this many times
UPLOAD_TIMEOUT_S = 300.0  # a local Bot API server takes files up to 2 GB
READY_WAIT_S = 3.0  # a delivery waits this long for the bot to connect before retrying
TICK_S = 0.2  # how often progress messages that are due an edit are looked at
SWEEP_S = 10.0  # every live progress message is re-read this often: queue positions
# move without an event of their own, and a pub/sub message can be missed.
STORYBOARD_TTL_S = 7 * 86400
REFUSAL_MEMORY_S = 30 * 86400
SHRINK_TRIES = 4
VIDEO_SHARE = 0.9  # of the byte budget spent on video bits; the rest is MP4 overhead
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{3,64}))?(?:\s+|$)")
# Why a progress message cannot take the result: the user deleted it; it cannot be
# edited; a (self-hosted) Bot API server too old to add media to a text message.
_UNEDITABLE = ("message to edit not found", "message can't be edited",
               "there is no media in the message to edit")


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def storyboard_key(chat_id: int, message_id: int) -> str:
    return f"{PREFIX}storyboard:{chat_id}:{message_id}"


def refused_key(user_id: int, chat_id: int) -> str:
    return f"{PREFIX}refused:{user_id}:{chat_id}"


def parse_command(text: str) -> tuple[str | None, str, str | None]:
    """``/video@bot a red fox`` → ``("video", "a red fox", "bot")``; text that is not a
    command → ``(None, text, None)``."""
    match = _COMMAND.match(text)
    if match is None:
        return None, text.strip(), None
    return match.group(1).lower(), text[match.end():].strip(), match.group(2)


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


@dataclass
class _Live:
    """A job whose progress message is still kept up to date."""

    chat_id: int
    message_id: int
    shown: str = ""  # the text the message has now
    next_edit: float = 0.0  # monotonic time before which it is not edited again


class ChatUnavailable(Exception):
    """Telegram (or the local Bot API server) did not take a delivery; it is retried."""


class ChatIntake:
    """The bot: ``start``/``stop`` with the daemon, ``deliver`` for the delivery loop."""

    def __init__(self, config: Config, queue: QueueClient):
        self.config = config
        self.chat = config.intake.chat
        self.queue = queue
        self.redis = queue.redis
        self.ready = asyncio.Event()  # set once the Bot API answered and polling runs
        self.upload_limit = int(self.chat.max_upload_mb * 1024 * 1024)
        self._secret = self.chat.secret
        self._log_filter = _RedactToken(self.redact)
        self._tasks: list[asyncio.Task[None]] = []
        self._live: dict[str, _Live] = {}
        self._dirty: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._kinds: dict[str, str] = {}  # command → job kind: /longexposure → long_exposure
        self._commands: dict[str, Callable[[Ask, str, Message], Awaitable[None]]] = {
            "start": self.cmd_help, "help": self.cmd_help, "status": self.cmd_status,
            "queue": self.cmd_queue, "cancel": self.cmd_cancel, "gpu": self.cmd_gpu,
            "storyboard": self.cmd_storyboard,
        }
        self.app: Application | None = None
        if self._secret is not None:
            self.app = self._build_application(self._secret)

    def _build_application(self, token: str) -> Application:
        app = (
            ApplicationBuilder()
            .token(token)
            .base_url(self.chat.base_url)
            .base_file_url(self.chat.base_file_url)
            .defaults(Defaults(parse_mode=ParseMode.HTML))
            # Telegram's flood limits: paced per chat and group, a 429 waits retry_after.
            .rate_limiter(AIORateLimiter(max_retries=RATE_LIMIT_RETRIES))
            .media_write_timeout(UPLOAD_TIMEOUT_S)
            .build()
        )
        app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self.on_message))
        app.add_handler(CallbackQueryHandler(self.on_render_button, pattern="^render$"))
        app.add_error_handler(self.on_error)
        return app

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background: a Bot API that is down must not keep the
        daemon's other intakes (or its deliveries) from running."""
        if self.app is None:
            log.error("chat bot disabled: its token is not set",
                      variable=self.chat.token.removeprefix("env:"))
            return
        from workers import pipelines  # imported late: the daemon does not need it otherwise

        self._kinds = {kind.replace("_", ""): kind for kind in pipelines.kinds()}
        self._install_log_filter()
        self._tasks.append(asyncio.create_task(self._connect()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.app is not None:
            if self.app.updater is not None and self.app.updater.running:
                await self.app.updater.stop()
            if self.app.running:
                await self.app.stop()
            await self.app.shutdown()
            await self.app.bot.shutdown()  # in case it never got past initialize
        self.ready.clear()
        self._remove_log_filter()

    async def _connect(self) -> None:
        assert self.app is not None and self.app.updater is not None
        delay = 1.0
        while True:
            try:
                await self.app.initialize()
                await self.app.updater.start_polling(
                    timeout=POLL_TIMEOUT_S, allowed_updates=[Update.MESSAGE,
                                                             Update.CALLBACK_QUERY],
                    error_callback=self._polling_error)
                break
            except InvalidToken:
                log.error("the Bot API refused the bot token; check [intake.chat] token",
                          base_url=self.chat.base_url)
                return
            except TelegramError as exc:
                log.warning("cannot reach the Bot API; retrying", base_url=self.chat.base_url,
                            error=self.redact(str(exc)), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)
        await self.app.start()
        await self._set_commands()
        try:
            await self._load_live()
        except RedisError as exc:  # the bot must come up all the same
            log.warning("redis unavailable: progress messages of a previous run are not "
                        "edited further (their last word still comes)", error=str(exc))
        self._tasks += [asyncio.create_task(self._watch_events()),
                        asyncio.create_task(self._keep_progress_current()),
                        asyncio.create_task(self._send_outbox())]
        self.ready.set()
        log.info("chat bot connected", username=self.app.bot.username,
                 base_url=self.chat.base_url, users=len(self.chat.allowed_user_ids),
                 groups=len(self.chat.allowed_chat_ids))

    async def _send_outbox(self) -> None:
        """Post what other processes left for the chat (the morning digest's summary),
        with the reliable-queue pattern: a message leaves Redis only once it was sent."""
        while True:
            try:
                await self._drain_outbox()
            except RedisError as exc:
                log.warning("redis unavailable for the chat outbox; retrying", error=str(exc))
                await asyncio.sleep(1)

    async def _drain_outbox(self) -> None:
        assert self.app is not None
        active = CHAT_OUTBOX_KEY + ":active"
        # What a crashed daemon (or this one, before Redis went away) was sending goes
        # out again: nothing else in this process sends from the outbox meanwhile.
        while await self.redis.lmove(active, CHAT_OUTBOX_KEY, "RIGHT", "LEFT"):
            pass
        delay = 1.0
        while True:
            raw = await self.redis.blmove(CHAT_OUTBOX_KEY, active, 5, "RIGHT", "LEFT")
            if raw is None:
                continue
            item = json.loads(raw)
            try:
                await self.app.bot.send_message(item["chat_id"], html.escape(item["text"]))
            except (NetworkError, RetryAfter) as exc:  # TimedOut is a NetworkError
                log.warning("could not post to the chat; retrying", error=self.redact(str(exc)),
                            retry_in_s=delay)
                await self.redis.lmove(active, CHAT_OUTBOX_KEY, "LEFT", "RIGHT")
                await asyncio.sleep(delay)
                delay = min(300.0, delay * 2)
                continue
            except TelegramError as exc:  # the chat is gone or refuses the bot: drop it
                log.error("the chat refused a message; dropped", chat_id=item["chat_id"],
                          error=self.redact(str(exc)))
            delay = 1.0
            await self.redis.lrem(active, 1, raw)

    async def _set_commands(self) -> None:
        """The command menu Telegram clients show; nice to have, so failures are only logged."""
        assert self.app is not None
        commands = [(command, f"a {kind.replace('_', ' ')} job")
                    for command, kind in self._kinds.items()]
        commands += [("storyboard", "see the scenes first, then reply render"),
                     ("status", "how a job is doing"), ("queue", "your jobs and the queue"),
                     ("cancel", "cancel one of your jobs"), ("gpu", "the GPU and its job"),
                     ("help", "what I can do")]
        try:
            await self.app.bot.set_my_commands(commands)
        except TelegramError as exc:
            log.warning("could not set the bot's command menu", error=self.redact(str(exc)))

    def _polling_error(self, exc: TelegramError) -> None:
        # PTB keeps polling with a growing pause; one line per failed poll, no traceback.
        log.warning("polling the Bot API failed; retrying", error=self.redact(str(exc)))

    # --- keeping the token out of logs ---------------------------------------------------

    def redact(self, text: str) -> str:
        if self._secret:
            for form in (self._secret, quote(self._secret, safe="")):
                text = text.replace(form, "<bot-token>")
        return text

    def _install_log_filter(self) -> None:
        # httpx logs every request URL, which contains the token, at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        for target in self._log_targets():
            target.addFilter(self._log_filter)

    def _remove_log_filter(self) -> None:
        for target in self._log_targets():
            target.removeFilter(self._log_filter)

    @staticmethod
    def _log_targets() -> list[logging.Filterer]:
        # The root handlers see every record; the two loggers cover a process without any.
        return [*logging.getLogger().handlers, logging.getLogger("httpx"),
                logging.getLogger("telegram")]

    # --- who may talk to the bot ---------------------------------------------------------

    def may_use(self, user_id: int, chat_id: int, private: bool) -> bool:
        user_ok = user_id in self.chat.allowed_user_ids or user_id in self.chat.admin_user_ids
        return user_ok and (private or chat_id in self.chat.allowed_chat_ids)

    async def _refuse_once(self, user_id: int, chat_id: int,
                           answer: Callable[[], Awaitable[object]]) -> None:
        """One refusal per user and chat, however often they write."""
        if not await self.redis.set(refused_key(user_id, chat_id), "1", nx=True,
                                    ex=REFUSAL_MEMORY_S):
            return
        log.warning("chat user refused: not on the allowlist; to let them in, add user_id to "
                    "[intake.chat] allowed_user_ids (and chat_id to allowed_chat_ids for a group)",
                    user_id=user_id, chat_id=chat_id)
        await answer()

    def _replies_to_me(self, message: Message) -> bool:
        assert self.app is not None
        original = message.reply_to_message
        return bool(original and original.from_user and original.from_user.id == self.app.bot.id)

    # --- updates -------------------------------------------------------------------------

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        assert self.app is not None
        command, args, addressee = parse_command(message.text or message.caption or "")
        if addressee is not None and addressee.lower() != (self.app.bot.username or "").lower():
            return  # a command for another bot in the same group
        private = message.chat.type == ChatType.PRIVATE
        to_me = self._replies_to_me(message)
        if not private and addressee is None and not to_me:
            return  # group talk: only what is addressed to the bot is for it
        user_id, chat_id = message.from_user.id, message.chat.id
        if not self.may_use(user_id, chat_id, private):
            await self._refuse_once(user_id, chat_id, lambda: message.reply_text(
                texts.refusal(user_id, chat_id, private)))
            return
        ask = Ask(user_id, chat_id, message.message_id)
        if command is None:
            if to_me and args.lower() == "render":
                assert message.reply_to_message is not None
                await self.render(ask, message.reply_to_message.message_id)
            elif private and attachment_of(message) is not None:
                await self.reply(ask, texts.caption_needed())
            elif private:
                await self.submit_message(ask, "video", args, message)
            return
        if command in self._commands:
            await self._commands[command](ask, args, message)
        elif command in self._kinds:
            await self.submit_message(ask, command, args, message)
        else:
            await self.reply(ask, texts.unknown_command(command))

    async def on_render_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE
                               ) -> None:
        query = update.callback_query
        assert query is not None
        storyboard = query.message
        if storyboard is None:  # too old for Telegram to say which message it was on
            await query.answer(texts.storyboard_gone(), show_alert=True)
            return
        chat = storyboard.chat
        if not self.may_use(query.from_user.id, chat.id, chat.type == ChatType.PRIVATE):
            await query.answer(texts.BUTTON_REFUSAL, show_alert=True)
            return
        await query.answer()
        record = await self._storyboard(chat.id, storyboard.message_id)
        request = record["request_message_id"] if record else storyboard.message_id
        await self.render(Ask(query.from_user.id, chat.id, request), storyboard.message_id,
                          record)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        assert error is not None
        if isinstance(error, RedisError):
            # Every command needs Redis; submit checks it before writing anything, so
            # "nothing was queued" holds (see submit for the one narrow exception).
            log.warning("a chat update failed: redis unavailable", error=str(error))
            text = texts.queue_unavailable()
        else:
            log.error("a chat update failed", error=self.redact(repr(error)),
                      traceback=self.redact("".join(traceback.format_exception(error))))
            text = texts.internal_error()
        if isinstance(update, Update) and update.effective_chat is not None and self.app:
            message = update.effective_message
            with contextlib.suppress(TelegramError):
                await self.app.bot.send_message(
                    update.effective_chat.id, text,
                    reply_parameters=_reply_to(message.message_id) if message else None)

    async def reply(self, ask: Ask, text: str, **kwargs: Any) -> Message:
        assert self.app is not None
        return await self.app.bot.send_message(
            ask.chat_id, text, reply_parameters=_reply_to(ask.message_id), **kwargs)

    # --- commands ------------------------------------------------------------------------

    async def cmd_help(self, ask: Ask, args: str, message: Message) -> None:
        assert self.app is not None
        await self.reply(ask, texts.help_text(
            {command: (kind, _inputs(kind)) for command, kind in self._kinds.items()},
            self.app.bot.username or "bot", self.chat.max_prompt_chars,
            self.chat.max_queued_per_user, self.chat.max_jobs_per_user_per_day))

    async def cmd_status(self, ask: Ask, args: str, message: Message) -> None:
        job_id = args.split()[0] if args else None
        if job_id is None:
            newest = await self.redis.zrevrange(recent_key(ask.submitter), 0, 0)
            if not newest:
                await self.reply(ask, texts.no_jobs_yet())
                return
            job_id = newest[0].decode()
        state = await self._visible_state(ask, job_id)
        if state is not None:
            await self.reply(ask, texts.status(state))

    async def cmd_queue(self, ask: Ask, args: str, message: Message) -> None:
        active = await self.queue.active_jobs(ask.submitter)
        length = await self.queue.queue_length()
        # Running jobs stay in arq's queue until they finish: count them apart.
        running = sum(1 for beat in await self.queue.workers() if beat.get("job_id"))
        await self.reply(ask, texts.queue_overview(active, max(0, length - running), running))

    async def cmd_cancel(self, ask: Ask, args: str, message: Message) -> None:
        if not args:
            await self.reply(ask, texts.cancel_usage(await self.queue.active_jobs(ask.submitter)))
            return
        job_id = args.split()[0]
        state = await self._visible_state(ask, job_id)
        if state is None:
            return
        outcome = await self.queue.cancel(job_id)
        log.info("chat cancel", job_id=job_id, user_id=ask.user_id, outcome=outcome)
        await self.reply(ask, texts.cancelled(job_id, outcome, str(state.get("status"))))

    async def cmd_gpu(self, ask: Ask, args: str, message: Message) -> None:
        workers = await self.queue.workers()
        running = {beat["job_id"]: await self.queue.get_state(beat["job_id"])
                   for beat in workers if beat.get("job_id")}
        await self.reply(ask, texts.gpu(workers, running))

    async def cmd_storyboard(self, ask: Ask, args: str, message: Message) -> None:
        """The scenes, planned here in a moment: no GPU time until the user says render."""
        from workers.pipelines import storyboard as planner

        if not args:
            await self.reply(ask, texts.usage("storyboard", takes_files=False))
            return
        video = self.config.video
        try:
            self._check_prompt(args)
            validate_request("video", args, {})
            board = planner.plan(planner.PlanRequest(prompt=args, fps=video.fps,
                                                     scene_seconds=video.scene_seconds))
        except JobError as exc:
            await self.reply(ask, texts.not_queued(str(exc)))
            return
        scenes = [{"description": scene.description, "camera": scene.camera,
                   # whole frames can round a scene a hair outside what a job may ask for
                   "duration_s": round(min(max(scene.duration_s, planner.MIN_SCENE_S),
                                           planner.MAX_SCENE_S), 3),
                   "subtitle": scene.subtitle} for scene in board.scenes]
        button = InlineKeyboardMarkup([[InlineKeyboardButton(texts.RENDER_BUTTON,
                                                             callback_data="render")]])
        sent = await self.reply(ask, texts.storyboard(board.title, scenes), reply_markup=button)
        record = {"prompt": args, "scenes": scenes, "request_message_id": ask.message_id}
        await self.redis.set(storyboard_key(ask.chat_id, sent.message_id), json.dumps(record),
                             ex=STORYBOARD_TTL_S)

    async def _storyboard(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        raw = await self.redis.get(storyboard_key(chat_id, message_id))
        return json.loads(raw) if raw else None

    async def render(self, ask: Ask, storyboard_message_id: int,
                     record: dict[str, Any] | None = None) -> None:
        """Queue the video of a storyboard this bot sent, with exactly its scenes."""
        record = record or await self._storyboard(ask.chat_id, storyboard_message_id)
        if record is None:
            await self.reply(ask, texts.storyboard_gone())
            return
        # One video per storyboard, whether asked for by reply or by button, once or twice.
        job_id = derive_job_id("telegram-render", str(ask.chat_id), str(storyboard_message_id))
        await self.submit(ask, "video", record["prompt"], options={"scenes": record["scenes"]},
                          job_id=job_id)

    async def _visible_state(self, ask: Ask, job_id: str) -> dict[str, Any] | None:
        """The job's state if this user may see it (theirs, or they are an admin); else
        answer why not and return None."""
        try:
            spec = read_spec(self.config.jobs_dir, job_id)
        except (JobError, OSError, ValueError):
            await self.reply(ask, texts.no_job(job_id))
            return None
        if spec.submitted_by != ask.submitter and ask.user_id not in self.chat.admin_user_ids:
            await self.reply(ask, texts.not_yours(job_id))
            return None
        state = await self.queue.get_state(job_id)
        if state is None:  # Redis forgot a finished job; its directory remembers
            outcome = JobOutcome.read(job_dir(self.config.jobs_dir, job_id))
            status = outcome.status if outcome else JobStatus.queued
            state = {"id": job_id, "status": status, "error": outcome and outcome.error,
                     "percent": 0.0, "prompt": spec.prompt}
        return state

    # --- submitting ----------------------------------------------------------------------

    async def submit_message(self, ask: Ask, command: str, prompt: str, message: Message
                             ) -> None:
        """A job of the kind ``command`` names, with the message's attachment if any."""
        kind = self._kinds[command]
        attachment = attachment_of(message)
        if not prompt and attachment is None:
            await self.reply(ask, texts.usage(command, takes_files=bool(_inputs(kind))))
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
                self._check_prompt(prompt)
                await self._check_caps(ask.user_id)
                options = validate_request(kind, prompt, options or {}, inputs)
                if attachment is not None:
                    await self._download(attachment, directory / "inputs")
            except JobError as exc:
                shutil.rmtree(directory, ignore_errors=True)  # a partial download; no spec yet
                await self.reply(ask, texts.not_queued(str(exc)))
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
        async with self._lock(job_id):
            try:
                result = await self.queue.enqueue(spec)
            except QueueFull as exc:
                shutil.rmtree(directory, ignore_errors=True)
                await self.reply(ask, texts.not_queued(str(exc)))
                return
            if not result.accepted:
                await self.reply(ask, texts.already_queued(job_id))
                return
            text = texts.progress(job_id, {"status": JobStatus.queued,
                                           "position": result.position})
            sent = await self.reply(ask, text)
            await self._record_progress_message(directory, sent.message_id)
            try:
                await self.queue.count_today(ask.submitter)
                await self._track(job_id, ask.chat_id, sent.message_id, text)
            except RedisError as exc:  # queued and answered: only the bookkeeping is lost
                log.warning("redis unavailable after queueing a chat job", job_id=job_id,
                            error=str(exc))
        log.info("job queued", job_id=job_id, kind=kind, user_id=ask.user_id,
                 chat_id=ask.chat_id, position=result.position)

    def _check_prompt(self, prompt: str) -> None:
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
        assert self.app is not None
        if attachment.size is not None and attachment.size > self.upload_limit:
            raise JobError(texts.attachment_too_large(attachment.size, self.upload_limit))
        try:
            remote = await self.app.bot.get_file(attachment.file_id)
            if remote.file_size is not None and remote.file_size > self.upload_limit:
                raise JobError(texts.attachment_too_large(remote.file_size,
                                                          self.upload_limit))
            with files.atomic_path(inputs / attachment.name) as tmp:
                await remote.download_to_drive(tmp)
        except TelegramError as exc:
            raise JobError(f"Telegram did not hand over the file: {self.redact(str(exc))}"
                           ) from None

    async def _record_progress_message(self, directory: Path, message_id: int) -> None:
        """On disk beside the spec: the delivery turns this message into the result, and
        must find it even when Redis has forgotten it."""
        try:
            await asyncio.to_thread(files.write_json, directory / PROGRESS_FILE,
                                    {"message_id": message_id})
        except OSError as exc:  # a full disk: Redis (and this run's memory) still know it
            log.warning("could not record the progress message in the job directory",
                        path=str(directory), error=str(exc))

    async def _progress_message_id(self, job_id: str, directory: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((directory / PROGRESS_FILE).read_text())["message_id"])
        # Not on disk: the disk was full, or the job was queued before that file existed.
        if live := self._live.get(job_id):
            return live.message_id
        message_id = await self.redis.hget(job_key(job_id), "progress_message_id")
        return None if message_id is None else int(message_id)

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    # --- progress ------------------------------------------------------------------------

    async def _track(self, job_id: str, chat_id: int, message_id: int, shown: str) -> None:
        # In memory first: this run keeps editing the message even if Redis is away now.
        self._live[job_id] = _Live(chat_id, message_id, shown,
                                   time.monotonic() + self.chat.progress_interval)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping={"chat_id": chat_id,
                                                "progress_message_id": message_id})
            pipe.expire(job_key(job_id), JOB_EXPIRY_S)
            pipe.sadd(LIVE_KEY, job_id)
            await pipe.execute()

    async def _load_live(self) -> None:
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

    async def _watch_events(self) -> None:
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

    async def _keep_progress_current(self) -> None:
        """Edit each changed progress message, at most once per progress_interval."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            due = [job_id for job_id in self._dirty
                   if job_id not in self._live or self._live[job_id].next_edit <= now]
            for job_id in due:
                self._dirty.discard(job_id)
                try:
                    await self._edit_progress(job_id)
                except Exception as exc:  # Redis away, or a bug: keep the other jobs going
                    log.warning("could not update a progress message", job_id=job_id,
                                error=self.redact(repr(exc)))
                    if live := self._live.get(job_id):
                        live.next_edit = now + self.chat.progress_interval
                        self._dirty.add(job_id)

    async def _edit_progress(self, job_id: str) -> None:
        assert self.app is not None
        async with self._lock(job_id):
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
                await self.app.bot.edit_message_text(text, chat_id=live.chat_id,
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

    # --- delivery ------------------------------------------------------------------------

    async def deliver(self, spec: JobSpec, outcome: JobOutcome, directory: Path) -> None:
        """Answer a finished job in its chat. Every step is recorded when done and skipped
        when found done, so the delivery loop may call this again after a failure or a
        restart. A step Telegram took just before a crash, unrecorded, is done again:
        the result is an edit of the progress message, so it still arrives once."""
        if self.app is None:
            raise ChatUnavailable("the chat bot is disabled: its token is not set")
        try:  # just after a start, the bot may still be connecting
            await asyncio.wait_for(self.ready.wait(), READY_WAIT_S)
        except TimeoutError:
            raise ChatUnavailable("not connected to the Bot API yet") from None
        ask = Ask.of_job(spec)
        steps = _DeliverySteps(directory / DELIVERY_FILE, self.redact)
        async with self._lock(spec.id):
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
                        await steps.run("failure", lambda: self._message_id(self.reply(
                            ask, texts.final(spec.id, outcome.status, outcome.error))))
                    await steps.run("progress", lambda: self._finish_progress(spec, outcome,
                                                                              directory))
            except TelegramError as exc:
                raise ChatUnavailable(self.redact(str(exc))) from None
        await self._forget(spec.id)

    async def _forget(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(LIVE_KEY, job_id)
            pipe.delete(job_key(job_id))
            await pipe.execute()
        self._live.pop(job_id, None)
        self._dirty.discard(job_id)
        self._locks.pop(job_id, None)

    @staticmethod
    async def _message_id(sending: Awaitable[Message]) -> dict[str, Any]:
        return {"message_id": (await sending).message_id}

    async def _send_primary(self, spec: JobSpec, outcome: JobOutcome, directory: Path,
                            ask: Ask) -> dict[str, Any]:
        """The result, in place of the progress message: a video as a playable video,
        anything else as a document."""
        assert outcome.primary is not None
        path = directory / outcome.primary
        report = _read_report(directory)
        progress_id = await self._progress_message_id(spec.id, directory)
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
                    await asyncio.to_thread(shrink_video, original, path, limit)
                except VideoTooLarge as exc:
                    return await self._instead_of_upload(spec, ask, progress_id, original,
                                                         report, limit, str(exc))
                size = path.stat().st_size
                note = texts.reencoded(size, limit, original.stat().st_size)
            width, height, duration = await asyncio.to_thread(probe_video, path)
            try:
                put = await self._put_file(
                    ask, progress_id, path, InputMediaVideo, filename=f"{spec.id}.mp4",
                    duration=round(duration), width=width, height=height,
                    supports_streaming=True,
                    caption=texts.caption(spec.id, report, duration, note))
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
        assert self.app is not None
        bot = self.app.bot

        async def edit(message_id: int) -> object:
            with open(path, "rb") as handle:
                return await bot.edit_message_media(
                    media(handle, **fields), chat_id=ask.chat_id, message_id=message_id,
                    read_timeout=UPLOAD_TIMEOUT_S)

        async def send() -> Message:
            upload = bot.send_video if media is InputMediaVideo else bot.send_document
            with open(path, "rb") as handle:
                return await upload(ask.chat_id, handle,
                                    reply_parameters=_reply_to(ask.message_id),
                                    read_timeout=UPLOAD_TIMEOUT_S, **fields)

        return await self._into_progress(ask, progress_id, edit, send)

    async def _put_text(self, ask: Ask, progress_id: int | None, text: str) -> dict[str, Any]:
        """``text`` in place of the progress message's (see ``_into_progress``)."""
        assert self.app is not None
        bot = self.app.bot
        return await self._into_progress(
            ask, progress_id,
            lambda message_id: bot.edit_message_text(text, chat_id=ask.chat_id,
                                                     message_id=message_id),
            lambda: self.reply(ask, text))

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
                if not any(why in reason for why in _UNEDITABLE):
                    raise
                log.info("the progress message cannot take the result; it goes as a new "
                         "message", chat_id=ask.chat_id, message_id=progress_id,
                         error=str(exc))
        # The progress message is gone (the user deleted it), cannot take the result (see
        # _UNEDITABLE) or was never recorded (the daemon died between sending and
        # recording it). This is the only non-idempotent path left for a result: a crash
        # after Telegram took the new message, before the step is recorded, sends it
        # a second time.
        return {"message_id": (await send()).message_id, "edited": False}

    async def _send_notice(self, spec: JobSpec, outcome: JobOutcome, directory: Path,
                           ask: Ask, result_id: int | None) -> dict[str, Any]:
        """A new message after the result, as a reply to it, because an edit notifies
        nobody: the HTML report as a document, or a short line when there is no report
        (or it is too large to upload). Unlike the result, this one can arrive twice if
        the daemon dies between Telegram taking it and the step being recorded."""
        assert self.app is not None
        reply = _reply_to(result_id or ask.message_id)
        path = directory / "report.html"
        if "report.html" in outcome.reports and path.is_file() and \
                path.stat().st_size <= self.upload_limit:
            try:
                with open(path, "rb") as report:
                    sent = await self.app.bot.send_document(
                        ask.chat_id, report, filename=f"{spec.id}.report.html",
                        caption=texts.report_notice(spec.id), reply_parameters=reply,
                        read_timeout=UPLOAD_TIMEOUT_S)
                return {"message_id": sent.message_id, "sent_as": "report"}
            except NetworkError as exc:
                if not _too_large(exc):
                    raise
        sent = await self.app.bot.send_message(ask.chat_id, texts.done_notice(spec.id),
                                               reply_parameters=reply)
        return {"message_id": sent.message_id, "sent_as": "line"}

    async def _finish_progress(self, spec: JobSpec, outcome: JobOutcome, directory: Path
                               ) -> dict[str, Any]:
        """The last word of a job in its progress message, when the message did not
        become the result (failed, cancelled, or the result went as a new message)."""
        assert self.app is not None
        message_id = await self._progress_message_id(spec.id, directory)
        if message_id is None:  # never sent (the reply failed), or forgotten long ago
            return {"skipped": "no progress message"}
        await self.app.bot.edit_message_text(
            texts.final(spec.id, outcome.status, outcome.error),
            chat_id=spec.source.chat_id, message_id=message_id)
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
            # "not modified": the message already says it; anything else will never work
            # (the chat is gone, the message deleted…): don't retry it forever.
            result = {} if "not modified" in str(exc) else {"skipped": self.redact(str(exc))}
        except Forbidden as exc:  # the user blocked the bot, or it left the group
            result = {"skipped": self.redact(str(exc))}
        if "skipped" in result:
            log.warning("chat delivery step skipped", step=name, path=str(self.path.parent),
                        reason=result["skipped"])
        self.done[name] = result
        await asyncio.to_thread(files.write_json, self.path, self.done)


def _inputs(kind: str) -> tuple[str, ...]:
    """The file suffixes a job kind takes (none: text only). Loads the kind's module, so
    only asked when needed, not for every kind at start."""
    from workers import pipelines

    return tuple(pipelines.load(kind).INPUTS)


def _reply_to(message_id: int) -> ReplyParameters:
    # The request may have been deleted meanwhile: then answer without quoting it.
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


def _too_large(exc: NetworkError) -> bool:
    text = str(exc).lower()
    return "too large" in text or "too big" in text


def _read_report(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class _RedactToken(logging.Filter):
    """Takes the bot token out of standard-library log records: httpx and PTB put it in
    request URLs and some error messages."""

    def __init__(self, redact: Callable[[str], str]):
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True


# --- files too large to upload ----------------------------------------------------------


class VideoTooLarge(Exception):
    """Even a small, low-bitrate copy of the video does not fit the upload limit."""


def probe_video(path: Path) -> tuple[int, int, float]:
    """Width, height and duration in seconds."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    width, height = meta["size"]
    return width, height, float(meta["duration"])


def shrink_video(source: Path, dest: Path, limit_bytes: int) -> None:
    """Re-encode ``source`` (H.264 at a bitrate computed from the budget) into ``dest``,
    atomically, so that it fits in ``limit_bytes``; smaller frames if the bitrate alone
    is not enough. Reuses a ``dest`` a previous attempt made. Raises ``VideoTooLarge``."""
    if dest.exists() and dest.stat().st_size <= limit_bytes:
        return
    width, height, duration = probe_video(source)
    bitrate = limit_bytes * 8 * VIDEO_SHARE / max(duration, 1.0)
    scale = 1.0
    with files.atomic_path(dest) as tmp:
        for _ in range(SHRINK_TRIES):
            size = f"{_even(width * scale)}:{_even(height * scale)}"
            # -an: the videos reelqueue makes are silent.
            command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin",
                       "-loglevel", "error", "-i", str(source), "-vf", f"scale={size}",
                       "-c:v", "libx264", "-preset", "veryfast", "-b:v", str(int(bitrate)),
                       "-maxrate", str(int(bitrate)), "-bufsize", str(int(bitrate * 2)),
                       "-pix_fmt", "yuv420p", "-an", "-movflags", "+faststart",
                       "-f", "mp4", "-y", str(tmp)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise VideoTooLarge(f"ffmpeg could not re-encode it: "
                                    f"{result.stderr.strip()[-300:]}")
            made = tmp.stat().st_size
            if made <= limit_bytes:
                return
            bitrate *= 0.9 * limit_bytes / made
            scale *= 0.75
        raise VideoTooLarge(f"a copy at {int(bitrate / 1000)} kbit/s was still "
                            f"{texts.size(made)}")


def _even(value: float) -> int:
    return max(2, int(value) // 2 * 2)


# --- links instead of uploads -----------------------------------------------------------


def signed_file_link(config: Config, job_id: str, name: str) -> str:
    """A link to a job's file on the HTTP API that works without a token."""
    return links.file_link(links.link_key(config.state_dir), job_id, name,
                           config.intake.http.link_ttl, config.intake.chat.public_base_url)
