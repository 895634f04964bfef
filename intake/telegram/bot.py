"""``ChatIntake``: the bot's lifecycle (connecting, long polling, stopping), who may use
it, keeping the token out of logs, and routing each update to the commands or a
submission. The parts it composes each have a module of their own (see ``__init__``).

Redis key: ``reelqueue:chat:refused:<user>:<chat>`` (a stranger was refused there once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import traceback
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from redis.exceptions import RedisError
from telegram import Message, Update
from telegram.constants import ChatType, ParseMode
from telegram.error import InvalidToken, TelegramError
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

from daemon.config import Config
from daemon.jobs import Channel, JobOutcome, JobSpec
from daemon.logs import get_logger
from daemon.outbox import Outbox
from daemon.submit import Submitter
from intake.telegram import texts
from intake.telegram.asks import Ask, reply, reply_to
from intake.telegram.commands import Commands
from intake.telegram.delivery import UPLOAD_TIMEOUT_S, ChatUnavailable, Delivery
from intake.telegram.outbox import chat_outbox
from intake.telegram.progress import PREFIX, ProgressMessages
from intake.telegram.submitting import Submissions, attachment_of

# python-telegram-bot 22 warns about its own coming timedelta change on every 429 it
# handles inside its rate limiter: a note about PTB's internals, not about this code.
warnings.filterwarnings("ignore", category=PTBDeprecationWarning)

log = get_logger(component="chat")

POLL_TIMEOUT_S = 10  # how long the Bot API server holds a getUpdates call open
RATE_LIMIT_RETRIES = 3  # a 429 is retried after its retry_after this many times
REFUSAL_MEMORY_S = 30 * 86400
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{3,64}))?(?:\s+|$)")


def refused_key(user_id: int, chat_id: int) -> str:
    return f"{PREFIX}refused:{user_id}:{chat_id}"


def parse_command(text: str) -> tuple[str | None, str, str | None]:
    """``/video@bot a red fox`` → ``("video", "a red fox", "bot")``; text that is not a
    command → ``(None, text, None)``."""
    match = _COMMAND.match(text)
    if match is None:
        return None, text.strip(), None
    return match.group(1).lower(), text[match.end():].strip(), match.group(2)


class ChatIntake:
    """The bot: ``start``/``stop`` with the daemon, ``deliver`` for the delivery loop.

    Without a token there is no bot: ``start`` says so, ``deliver`` refuses, and the
    parts below are never made."""

    name = Channel.chat
    kinds: dict[str, str]  # command → job kind
    progress: ProgressMessages
    submissions: Submissions
    commands: Commands
    delivery: Delivery
    outbox: Outbox

    def __init__(self, config: Config, submitter: Submitter):
        self.config = config
        self.chat = config.intake.chat
        self.queue = submitter.queue
        self.redis = submitter.queue.redis
        self.ready = asyncio.Event()  # set once the Bot API answered and polling runs
        self._secret = self.chat.secret
        self._log_filter = _RedactToken(self.redact)
        self._tasks: list[asyncio.Task[None]] = []
        self.app: Application | None = None
        if self._secret is None:
            return
        self.app = self._build_application(self._secret)
        bot, upload_limit = self.app.bot, int(self.chat.max_upload_mb * 1024 * 1024)
        # Command → job kind, one per kind: /longexposure → long_exposure.
        self.kinds = {kind.replace("_", ""): kind for kind in submitter.kinds.names()}
        self.progress = ProgressMessages(self.chat, self.queue, bot, self.redact)
        self.submissions = Submissions(config, submitter, bot, self.progress, self.redact,
                                       upload_limit, self.kinds)
        self.commands = Commands(config, submitter, bot, self.submissions, self.kinds)
        self.delivery = Delivery(config, bot, self.progress, self.ready, self.redact,
                                 upload_limit)
        self.outbox = chat_outbox(self.redis, bot, self.redact)

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

    async def deliver(self, spec: JobSpec, outcome: JobOutcome, directory: Path) -> None:
        """See ``Delivery.deliver``."""
        if self.app is None:
            raise ChatUnavailable("the chat bot is disabled: its token is not set")
        await self.delivery.deliver(spec, outcome, directory)

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
            await self.progress.load_live()
        except RedisError as exc:  # the bot must come up all the same
            log.warning("redis unavailable: progress messages of a previous run are not "
                        "edited further (their last word still comes)", error=str(exc))
        self._tasks += [asyncio.create_task(self.progress.watch_events()),
                        asyncio.create_task(self.progress.keep_current()),
                        asyncio.create_task(self.outbox.post_forever())]
        self.ready.set()
        log.info("chat bot connected", username=self.app.bot.username,
                 base_url=self.chat.base_url, users=len(self.chat.allowed_user_ids),
                 groups=len(self.chat.allowed_chat_ids))

    async def _set_commands(self) -> None:
        """The command menu Telegram clients show; nice to have, so failures are only logged."""
        assert self.app is not None
        commands = [(command, f"a {kind.replace('_', ' ')} job")
                    for command, kind in self.kinds.items()]
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
                await self.commands.render(ask, message.reply_to_message.message_id)
            elif private and attachment_of(message) is not None:
                await reply(self.app.bot, ask, texts.caption_needed())
            elif private:
                await self.submissions.submit_message(ask, "video", args, message)
            return
        if command in self.commands.by_name:
            await self.commands.by_name[command](ask, args, message)
        elif command in self.kinds:
            await self.submissions.submit_message(ask, command, args, message)
        else:
            await reply(self.app.bot, ask, texts.unknown_command(command))

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
        record = await self.commands.storyboard_record(chat.id, storyboard.message_id)
        request = record["request_message_id"] if record else storyboard.message_id
        await self.commands.render(Ask(query.from_user.id, chat.id, request),
                                   storyboard.message_id, record)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        assert error is not None
        if isinstance(error, RedisError):
            # Every command needs Redis. A submission that fails on it leaves nothing
            # (daemon.submit undoes what it wrote), so "nothing was queued" holds.
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
                    reply_parameters=reply_to(message.message_id) if message else None)


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
