"""The bot's commands other than the job kinds: /help, /status, /queue, /cancel, /gpu and
/storyboard, with the Render that turns a storyboard into a video.

Redis key: ``reelqueue:chat:storyboard:<chat>:<msg>`` (a storyboard's prompt and scenes,
for the Render that may follow).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Message

from daemon import storyboard as planner
from daemon.config import Config
from daemon.jobs import JobError, derive_job_id
from daemon.logs import get_logger
from daemon.lookup import find_job
from daemon.queue import recent_key
from daemon.submit import Submitter
from intake.telegram import texts
from intake.telegram.asks import Ask, reply
from intake.telegram.progress import PREFIX
from intake.telegram.submitting import Submissions

log = get_logger(component="chat")

STORYBOARD_TTL_S = 7 * 86400

Command = Callable[[Ask, str, Message], Awaitable[None]]


def storyboard_key(chat_id: int, message_id: int) -> str:
    return f"{PREFIX}storyboard:{chat_id}:{message_id}"


class Commands:
    """``by_name`` maps a command (without its slash) to its handler."""

    def __init__(self, config: Config, submitter: Submitter, bot: Bot,
                 submissions: Submissions, kinds: dict[str, str]):
        self.config = config
        self.chat = config.intake.chat
        self.registry = submitter.kinds
        self.queue = submitter.queue
        self.redis = submitter.queue.redis
        self.bot = bot
        self.submissions = submissions
        self.kinds = kinds  # command → job kind: /longexposure → long_exposure
        self.by_name: dict[str, Command] = {
            "start": self.help, "help": self.help, "status": self.status,
            "queue": self.queue_overview, "cancel": self.cancel, "gpu": self.gpu,
            "storyboard": self.storyboard,
        }

    async def help(self, ask: Ask, args: str, message: Message) -> None:
        await reply(self.bot, ask, texts.help_text(
            {command: (kind, self.registry.inputs(kind)) for command, kind in self.kinds.items()},
            self.bot.username or "bot", self.chat.max_prompt_chars,
            self.chat.max_queued_per_user, self.chat.max_jobs_per_user_per_day))

    async def status(self, ask: Ask, args: str, message: Message) -> None:
        job_id = args.split()[0] if args else None
        if job_id is None:
            newest = await self.redis.zrevrange(recent_key(ask.submitter), 0, 0)
            if not newest:
                await reply(self.bot, ask, texts.no_jobs_yet())
                return
            job_id = newest[0].decode()
        state = await self._visible_state(ask, job_id)
        if state is not None:
            await reply(self.bot, ask, texts.status(state))

    async def queue_overview(self, ask: Ask, args: str, message: Message) -> None:
        active = await self.queue.active_jobs(ask.submitter)
        length = await self.queue.queue_length()
        # Running jobs stay in arq's queue until they finish: count them apart.
        running = sum(1 for beat in await self.queue.workers() if beat.get("job_id"))
        await reply(self.bot, ask, texts.queue_overview(active, max(0, length - running),
                                                        running))

    async def cancel(self, ask: Ask, args: str, message: Message) -> None:
        if not args:
            await reply(self.bot, ask,
                        texts.cancel_usage(await self.queue.active_jobs(ask.submitter)))
            return
        job_id = args.split()[0]
        state = await self._visible_state(ask, job_id)
        if state is None:
            return
        outcome = await self.queue.cancel(job_id)
        log.info("chat cancel", job_id=job_id, user_id=ask.user_id, outcome=outcome)
        await reply(self.bot, ask, texts.cancelled(job_id, outcome, str(state.get("status"))))

    async def gpu(self, ask: Ask, args: str, message: Message) -> None:
        workers = await self.queue.workers()
        running = {beat["job_id"]: await self.queue.get_state(beat["job_id"])
                   for beat in workers if beat.get("job_id")}
        await reply(self.bot, ask, texts.gpu(workers, running))

    async def storyboard(self, ask: Ask, args: str, message: Message) -> None:
        """The scenes, planned here in a moment: no GPU time until the user says render."""
        if not args:
            await reply(self.bot, ask, texts.usage("storyboard", takes_files=False))
            return
        video = self.config.video
        try:
            self.registry.validate("video", args, {},
                                   max_prompt_chars=self.chat.max_prompt_chars)
            board = planner.plan(planner.PlanRequest(prompt=args, fps=video.fps,
                                                     scene_seconds=video.scene_seconds))
        except JobError as exc:
            await reply(self.bot, ask, texts.not_queued(str(exc)))
            return
        scenes = [{"description": scene.description, "camera": scene.camera,
                   # whole frames can round a scene a hair outside what a job may ask for
                   "duration_s": round(min(max(scene.duration_s, planner.MIN_SCENE_S),
                                           planner.MAX_SCENE_S), 3),
                   "subtitle": scene.subtitle} for scene in board.scenes]
        button = InlineKeyboardMarkup([[InlineKeyboardButton(texts.RENDER_BUTTON,
                                                             callback_data="render")]])
        sent = await reply(self.bot, ask, texts.storyboard(board.title, scenes),
                           reply_markup=button)
        record = {"prompt": args, "scenes": scenes, "request_message_id": ask.message_id}
        await self.redis.set(storyboard_key(ask.chat_id, sent.message_id), json.dumps(record),
                             ex=STORYBOARD_TTL_S)

    async def storyboard_record(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        """What a storyboard message this bot sent showed, while it is remembered."""
        raw = await self.redis.get(storyboard_key(chat_id, message_id))
        return json.loads(raw) if raw else None

    async def render(self, ask: Ask, storyboard_message_id: int,
                     record: dict[str, Any] | None = None) -> None:
        """Queue the video of a storyboard this bot sent, with exactly its scenes."""
        record = record or await self.storyboard_record(ask.chat_id, storyboard_message_id)
        if record is None:
            await reply(self.bot, ask, texts.storyboard_gone())
            return
        # One video per storyboard, whether asked for by reply or by button, once or twice.
        job_id = derive_job_id("telegram-render", str(ask.chat_id), str(storyboard_message_id))
        await self.submissions.submit(ask, "video", record["prompt"],
                                      options={"scenes": record["scenes"]}, job_id=job_id)

    async def _visible_state(self, ask: Ask, job_id: str) -> dict[str, Any] | None:
        """The job's state if this user may see it (theirs, or they are an admin); else
        answer why not and return None."""
        found = await find_job(self.queue, self.config.jobs_dir, job_id)
        if found is None:
            await reply(self.bot, ask, texts.no_job(job_id))
            return None
        spec, state = found
        if spec.submitted_by != ask.submitter and ask.user_id not in self.chat.admin_user_ids:
            await reply(self.bot, ask, texts.not_yours(job_id))
            return None
        return state
