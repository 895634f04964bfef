"""The chat channel, against a fake Bot API server (tests/fake_bot_api.py) that the real
python-telegram-bot client talks to over loopback.

Most tests run ``ChatIntake`` in this process with a real Redis and no worker: a job
that needs a result gets a video rendered once per module. The end-to-end tests at the
bottom spawn the real daemon and worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from daemon import encoding
from daemon.compose import read_config
from daemon.delivery import DeliveryLoop
from daemon.jobs import (
    Channel,
    JobOutcome,
    JobSpec,
    JobStatus,
    Source,
    job_dir,
    read_spec,
    write_spec,
)
from daemon.queue import QueueClient, worker_key
from daemon.redis_server import EmbeddedRedis
from intake.http import HttpApi
from intake.telegram import delivery as chat_delivery
from intake.telegram.bot import ChatIntake, parse_command
from intake.telegram.delivery import ChatUnavailable
from intake.telegram.progress import LIVE_KEY, job_key
from tests.conftest import submitter_for, wait_for, write_config
from tests.fake_bot_api import BOT_USERNAME, TOKEN, FakeBotApi
from workers.pipelines import encode
from workers.runner import run_job_sync

pytestmark = [
    pytest.mark.timeout(90),
    # PTB 22 warns about its own RetryAfter.retry_after whenever it builds one (a 429).
    pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning"),
    # aiohttp's multipart parser, in the fake server, now and then on an upload.
    pytest.mark.filterwarnings("ignore:unread_data:DeprecationWarning"),
]

ALICE, BOB, ADMIN, STRANGER = 111, 112, 113, 999
GROUP, OTHER_GROUP = -100500, -100600
SMALL_VIDEO = "width = 128\nheight = 96\nfps = 8\nscene_seconds = 3"


def chat_section(api: FakeBotApi, **overrides: object) -> str:
    values: dict[str, object] = {
        "enabled": "true", "token": f'"{TOKEN}"',
        "base_url": f'"{api.base_url}"', "base_file_url": f'"{api.base_file_url}"',
        "allowed_user_ids": f"[{ALICE}, {BOB}]", "allowed_chat_ids": f"[{GROUP}]",
        "admin_user_ids": f"[{ADMIN}]", "progress_interval": '"0.5s"', **overrides}
    return "\n".join(f"{key} = {value}" for key, value in values.items())


@pytest.fixture
def bot_api():
    with FakeBotApi() as api:
        yield api


@pytest.fixture
async def make_chat(tmp_path, redis_url, bot_api) -> AsyncIterator[Callable[..., Awaitable]]:
    """Start a ChatIntake on a fresh config; ``overrides`` are [intake.chat] keys."""
    started: list[tuple[ChatIntake, QueueClient]] = []

    async def make(**overrides: object) -> ChatIntake:
        config = read_config(write_config(tmp_path, redis_url, video=SMALL_VIDEO, **{
            "intake.chat": chat_section(bot_api, **overrides)}))
        queue = await QueueClient.open(config.redis.url)
        chat = ChatIntake(config, submitter_for(config, queue))
        started.append((chat, queue))
        await chat.start()
        await asyncio.wait_for(chat.ready.wait(), 10)
        return chat

    yield make
    for chat, queue in started:
        await chat.stop()
        await queue.close()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A finished video job's directory, rendered once for the module."""
    root = tmp_path_factory.mktemp("rendered")
    config = read_config(write_config(root, video=SMALL_VIDEO))
    spec = JobSpec(id="template", kind="video", source=Source(channel=Channel.cli),
                   prompt="A red fox runs through the snow. It looks back at the camera.")
    write_spec(config.jobs_dir, spec)
    assert run_job_sync(spec, config).status == JobStatus.done
    return config.jobs_dir / spec.id


@pytest.fixture(scope="module")
def loud(rendered, tmp_path_factory) -> Path:
    """The rendered job with a video worth shrinking: 320×240 of fine detail (about
    400 kB) and a 440 Hz tone as its AAC sound track."""
    directory = tmp_path_factory.mktemp("loud") / "template"
    shutil.copytree(rendered, directory)
    lavfi = ("-f", "lavfi", "-i")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
                    *lavfi, "testsrc2=size=320x240:rate=8:duration=6",
                    *lavfi, "sine=frequency=440:duration=6:sample_rate=48000",
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "4", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", "-y",
                    str(directory / "video.mp4")], check=True)
    return directory


async def finish_like_a_worker(chat: ChatIntake, job_id: str, rendered: Path) -> None:
    """What the worker leaves behind for a job: its artifacts, and a finished state."""
    directory = job_dir(chat.config.jobs_dir, job_id)
    for item in rendered.iterdir():
        if item.name != "spec.json":
            copy = shutil.copytree if item.is_dir() else shutil.copy
            copy(item, directory / item.name)
    await chat.queue.finish(job_id, JobStatus.done)


async def deliver(chat: ChatIntake, job_id: str) -> None:
    directory = job_dir(chat.config.jobs_dir, job_id)
    spec = read_spec(chat.config.jobs_dir, job_id)
    outcome = JobOutcome.read(directory)
    assert outcome is not None
    await chat.deliver(spec, outcome, directory)


async def ask_for_video(api: FakeBotApi, prompt: str = "a red fox", user: int = ALICE
                        ) -> tuple[dict, str, int]:
    """Send /video; return the request message, the job id and the progress message id."""
    before = len(api.sent("sendMessage", chat_id=user))
    request = api.user_message(user, f"/video {prompt}")
    reply = (await api.until("sendMessage", before + 1, chat_id=user))[-1]
    assert "is queued" in reply.params["text"], reply.params["text"]
    job_id = reply.params["text"].split("<code>")[1].split("</code>")[0]
    return request, job_id, reply.result["message_id"]


async def answer_to(api: FakeBotApi, chat_id: int, text: str, user: int | None = None,
                    **message: object) -> str:
    """Send a message and return the bot's one new answer in that chat."""
    before = len(api.sent("sendMessage", chat_id=chat_id))
    api.user_message(user or chat_id, text, chat_id=chat_id, **message)
    return (await api.until("sendMessage", before + 1, chat_id=chat_id))[-1].params["text"]


async def eventually(check: Callable[[], Awaitable[object]], timeout: float = 5) -> object:
    """The first truthy result of ``check``, polled."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return result


def edits(api: FakeBotApi, message_id: int, chat_id: int = ALICE) -> list:
    return api.sent("editMessageText", chat_id=chat_id, message_id=message_id)


def upload(call) -> tuple[str, int]:
    """The one file a call uploaded: (name, size). editMessageMedia names its field."""
    [uploaded] = call.files.values()
    return uploaded


def job_ids(chat: ChatIntake) -> list[str]:
    jobs = chat.config.jobs_dir
    return sorted(p.parent.name for p in jobs.glob("*/spec.json")) if jobs.exists() else []


# --- parsing ---------------------------------------------------------------------------------


def test_commands_are_parsed_with_or_without_the_bot_name():
    assert parse_command("/video@Reel_bot a red fox") == ("video", "a red fox", "Reel_bot")
    assert parse_command("/VIDEO\na fox\nin snow") == ("video", "a fox\nin snow", None)
    assert parse_command("/help") == ("help", "", None)
    assert parse_command("a red fox /video") == (None, "a red fox /video", None)
    assert parse_command("/ not a command") == (None, "/ not a command", None)


# --- who is served --------------------------------------------------------------------------


async def test_strangers_get_one_polite_refusal_and_no_job(make_chat, bot_api):
    chat = await make_chat()
    for text in ("/video a red fox", "hello?", "/help"):
        bot_api.user_message(STRANGER, text)
    refusal = (await bot_api.until("sendMessage", chat_id=STRANGER))[0].params["text"]
    assert "private" in refusal and str(STRANGER) in refusal
    # An allowed user in a group that is not allowed: refused once too, the group named.
    for _ in range(2):
        bot_api.user_message(ALICE, f"/video@{BOT_USERNAME} a fox", chat_id=OTHER_GROUP,
                             chat_type="supergroup")
    group_refusal = (await bot_api.until("sendMessage", chat_id=OTHER_GROUP))[0]
    assert str(OTHER_GROUP) in group_refusal.params["text"]
    await answer_to(bot_api, ALICE, "/help")  # everything before it has been handled
    assert len(bot_api.sent("sendMessage", chat_id=STRANGER)) == 1
    assert len(bot_api.sent("sendMessage", chat_id=OTHER_GROUP)) == 1
    assert job_ids(chat) == []


async def test_in_a_group_only_what_is_addressed_to_the_bot_is_answered(make_chat, bot_api):
    chat = await make_chat()
    group = {"chat_id": GROUP, "chat_type": "supergroup"}
    bot_api.user_message(ALICE, "a red fox in the snow", **group)
    bot_api.user_message(ALICE, "/video a red fox", **group)  # to every bot: not ours
    bot_api.user_message(ALICE, "/video@some_other_bot a red fox", **group)
    answer = await answer_to(bot_api, GROUP, f"/help@{BOT_USERNAME}", ALICE,
                             chat_type="supergroup")
    assert "/storyboard" in answer
    assert len(bot_api.sent("sendMessage", chat_id=GROUP)) == 1  # the three before: nothing
    mine = bot_api.sent("sendMessage", chat_id=GROUP)[0].result
    answer = await answer_to(bot_api, GROUP, "/queue", ALICE, chat_type="supergroup",
                             reply_to=mine)  # a reply to the bot is addressed to it
    assert "no jobs" in answer
    bot_api.user_message(ALICE, "thanks!", reply_to=mine, **group)  # plain text: ignored
    await answer_to(bot_api, ALICE, "/help")
    assert len(bot_api.sent("sendMessage", chat_id=GROUP)) == 2
    assert job_ids(chat) == []


# --- submitting ------------------------------------------------------------------------------


async def test_a_request_is_queued_and_answered_with_its_position(make_chat, bot_api):
    chat = await make_chat()
    request, job_id, progress_id = await ask_for_video(bot_api, "a red fox")
    text = bot_api.sent("sendMessage", chat_id=ALICE)[-1].params["text"]
    assert "position 1" in text
    spec = read_spec(chat.config.jobs_dir, job_id)
    assert (spec.kind, spec.prompt, spec.submitted_by) == ("video", "a red fox", f"tg:{ALICE}")
    assert (spec.source.channel, spec.source.chat_id, spec.source.message_id) == (
        Channel.chat, ALICE, request["message_id"])
    reply = bot_api.sent("sendMessage", chat_id=ALICE)[-1]
    assert reply.params["reply_parameters"]["message_id"] == request["message_id"]
    stored = await eventually(lambda: chat.redis.hget(job_key(job_id),
                                                      "progress_message_id"))
    assert int(stored) == progress_id

    # In a private chat, plain text is a video prompt too.
    answer = await answer_to(bot_api, ALICE, "a blue whale sings")
    assert "position 2" in answer
    # The same update delivered twice (after a crash) is still one job.
    bot_api.push_update({"message": request})
    assert "already job" in (await bot_api.until("sendMessage", 3, chat_id=ALICE))[-1].params[
        "text"]
    assert len(job_ids(chat)) == 2


async def test_with_redis_down_the_user_is_told_and_nothing_is_left_behind(tmp_path, bot_api):
    server = EmbeddedRedis(tmp_path / "own-redis")  # its own Redis, to kill
    server.start()
    config = read_config(write_config(tmp_path, server.url, video=SMALL_VIDEO, **{
        "intake.chat": chat_section(bot_api)}))
    queue = await QueueClient.open(config.redis.url)
    chat = ChatIntake(config, submitter_for(config, queue))
    try:
        await chat.start()
        await asyncio.wait_for(chat.ready.wait(), 10)
        server.process.kill()
        server.process.wait()
        for count, text in enumerate(("/video a red fox", "/status"), 1):
            request = bot_api.user_message(ALICE, text)
            answer = (await bot_api.until("sendMessage", count, chat_id=ALICE))[-1].params
            assert "queue is unavailable right now (its Redis server is down)" in \
                answer["text"] and "nothing was queued" in answer["text"]
            assert answer["reply_parameters"]["message_id"] == request["message_id"]
        assert job_ids(chat) == []  # no spec.json of a job that was never queued
        server.start()  # back: the same client reconnects
        _, job_id, _ = await ask_for_video(bot_api, "a red fox")
        assert job_ids(chat) == [job_id]
    finally:
        await chat.stop()
        await queue.close()
        server.stop(only_if_idle=False)


async def test_redis_dying_mid_submit_leaves_nothing_and_the_update_again_queues_it(
        make_chat, bot_api, monkeypatch):
    chat = await make_chat()
    enqueue = chat.queue.enqueue

    async def redis_dies(spec: JobSpec) -> None:
        monkeypatch.setattr(chat.queue, "enqueue", enqueue)  # back for the next try
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(chat.queue, "enqueue", redis_dies)  # after the spec is written
    request = bot_api.user_message(ALICE, "/video a red fox")
    answer = (await bot_api.until("sendMessage", chat_id=ALICE))[0].params["text"]
    assert "nothing was queued" in answer
    assert job_ids(chat) == []  # true: no folder left to look "queued" for ever…
    bot_api.push_update({"message": request})  # …and the same update again queues it
    answer = (await bot_api.until("sendMessage", 2, chat_id=ALICE))[-1].params["text"]
    assert "is queued" in answer
    [job_id] = job_ids(chat)
    assert job_id in answer
    assert (await chat.queue.get_state(job_id))["status"] == JobStatus.queued
    assert job_ids(chat) == [job_id]


async def test_caps_say_when_they_reset(make_chat, bot_api):
    chat = await make_chat(max_queued_per_user=2, max_jobs_per_user_per_day=3,
                           max_prompt_chars=40)
    first = (await ask_for_video(bot_api, "fox one"))[1]
    await ask_for_video(bot_api, "fox two")
    answer = await answer_to(bot_api, ALICE, "/video fox three")
    assert "Not queued" in answer and "2 jobs queued or running (the limit is 2)" in answer
    assert "/cancel" in answer
    assert "Cancelled" in await answer_to(bot_api, ALICE, f"/cancel {first}")
    third = (await ask_for_video(bot_api, "fox three"))[1]
    await answer_to(bot_api, ALICE, f"/cancel {third}")
    answer = await answer_to(bot_api, ALICE, "/video fox four")
    assert "all 3 jobs for today" in answer and "resets at 00:00 UTC, in " in answer
    answer = await answer_to(bot_api, BOB, "/video " + "x" * 41)
    assert "41 characters long; the limit is 40" in answer
    assert len(job_ids(chat)) == 3


async def test_status_queue_cancel_gpu_and_help(make_chat, bot_api):
    chat = await make_chat()
    _, job_id, _ = await ask_for_video(bot_api)
    assert "someone else" in await answer_to(bot_api, BOB, f"/cancel {job_id}")
    assert "someone else" in await answer_to(bot_api, BOB, f"/status {job_id}")
    assert "is queued" in await answer_to(bot_api, ADMIN, f"/status {job_id}")
    overview = await answer_to(bot_api, ALICE, "/queue")
    assert job_id in overview and "1 waiting, 0 running" in overview
    assert job_id in await answer_to(bot_api, ALICE, "/cancel")  # which one? yours: …
    assert "no job" in (await answer_to(bot_api, ALICE, "/cancel 0123abcd")).lower()
    assert "No GPU worker" in await answer_to(bot_api, ALICE, "/gpu")

    # A worker's heartbeat, with and without VRAM figures.
    beat = {"name": "gpu0", "device": "NVIDIA L4", "job_id": job_id, "ts": time.time(),
            "vram_used": 2 * 1024**3, "vram_total": 24 * 1024**3}
    await chat.redis.sadd("reelqueue:workers", "gpu0", "gpu1")
    await chat.redis.set(worker_key("gpu0"), json.dumps(beat))
    await chat.redis.set(worker_key("gpu1"), json.dumps({"name": "gpu1", "device": "cpu",
                                                         "ts": time.time()}))
    await chat.queue.update_state(job_id, status=JobStatus.running, stage="render", percent=40)
    gpu = await answer_to(bot_api, ALICE, "/gpu")
    assert "NVIDIA L4" in gpu and "2.0 GiB used, 22.0 GiB free of 24.0 GiB" in gpu
    assert f"Running job <code>{job_id}</code>: rendering, 40%" in gpu
    assert "VRAM: not reported" in gpu and "Idle." in gpu

    status = await answer_to(bot_api, ALICE, "/status")  # the newest job
    assert "rendering" in status and "40%" in status and "a red fox" in status
    assert "Cancelled" in await answer_to(bot_api, ALICE, f"/cancel {job_id}")
    await chat.redis.delete(worker_key("gpu0"), worker_key("gpu1"))
    help_text = await answer_to(bot_api, ALICE, "/help")
    assert "/video" in help_text and "/storyboard" in help_text and "3 jobs queued" in help_text
    assert "don't know /dance" in await answer_to(bot_api, ALICE, "/dance")


async def test_attachments_are_checked_before_they_are_fetched(make_chat, bot_api):
    chat = await make_chat(max_upload_mb=1)
    photo = [{"file_id": "small", "file_unique_id": "s", "width": 90, "height": 90,
              "file_size": 4}]
    # /video takes no files: the validation error says so, and nothing is fetched.
    answer = await answer_to(bot_api, ALICE, None, caption="/video a fox", photo=photo)
    assert "takes no input files" in answer and "photo.jpg" in answer
    assert "caption" in await answer_to(bot_api, ALICE, None, photo=photo)
    # A kind that takes images: the size is checked before anything is downloaded…
    big = [{**photo[0], "file_id": "big", "file_size": 5 * 1024 * 1024}]
    answer = await answer_to(bot_api, ALICE, None, caption="/longexposure", photo=big)
    assert "the file is 5.0 MB; this bot takes files up to 1.0 MB" in answer
    assert bot_api.attempts("getFile") == [] and job_ids(chat) == []
    # …then the file lands in the job's inputs.
    bot_api.add_file("small", b"JPEG", "photos/file_1.jpg")
    answer = await answer_to(bot_api, ALICE, None, caption="/longexposure", photo=photo)
    assert "is queued" in answer
    [job_id] = job_ids(chat)
    spec = read_spec(chat.config.jobs_dir, job_id)
    assert (spec.kind, spec.inputs) == ("long_exposure", ["photo.jpg"])
    inputs = job_dir(chat.config.jobs_dir, job_id) / "inputs"
    assert (inputs / "photo.jpg").read_bytes() == b"JPEG"


async def test_storyboard_comes_at_once_and_render_queues_exactly_it(make_chat, bot_api):
    chat = await make_chat()
    started = time.monotonic()
    bot_api.user_message(ALICE, "/storyboard A red fox runs through the snow. "
                                "It looks back at the camera.")
    board = (await bot_api.until("sendMessage", chat_id=ALICE))[0]
    assert time.monotonic() - started < 5 and job_ids(chat) == []
    text = board.params["text"]
    assert "Storyboard" in text and "2 scenes" in text and "1. wide shot, 3 s: A red fox" in text
    assert board.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "render"

    answer = await answer_to(bot_api, ALICE, "render", reply_to=board.result)
    assert "is queued" in answer
    [job_id] = job_ids(chat)
    scenes = read_spec(chat.config.jobs_dir, job_id).options["scenes"]
    assert [s["description"] for s in scenes] == ["A red fox runs through the snow.",
                                                  "It looks back at the camera."]
    bot_api.button_press(ALICE, board.result, "render")  # the button: the same video
    assert "already job" in (await bot_api.until("sendMessage", 3, chat_id=ALICE))[-1].params[
        "text"]
    assert bot_api.sent("answerCallbackQuery")
    # The job renders the storyboard the user saw.
    spec = read_spec(chat.config.jobs_dir, job_id)
    assert (await asyncio.to_thread(run_job_sync, spec, chat.config)).status == JobStatus.done
    planned = json.loads((job_dir(chat.config.jobs_dir, job_id) / "storyboard.json").read_text())
    assert [(s["description"], s["camera"]) for s in planned["scenes"]] == [
        (s["description"], s["camera"]) for s in scenes]


# --- progress --------------------------------------------------------------------------------


async def test_progress_edits_are_throttled_under_a_burst_of_events(make_chat, bot_api):
    chat = await make_chat(progress_interval='"0.5s"')
    _, job_id, message_id = await ask_for_video(bot_api)
    started = time.time()
    await chat.queue.update_state(job_id, status=JobStatus.running, stage="render",
                                  started_at=started)
    burst_began = time.monotonic()
    for percent in range(5, 65):  # 60 events in 1.5 s
        await chat.queue.update_state(job_id, stage="render", percent=percent,
                                      message="scene 1 of 2")
        await asyncio.sleep(0.025)
    burst_s = time.monotonic() - burst_began
    last = await bot_api.until("editMessageText", 1, message_id=message_id, timeout=5)
    deadline = time.monotonic() + 3
    while "64%" not in edits(bot_api, message_id)[-1].params["text"]:
        assert time.monotonic() < deadline, "the last progress never showed"
        await asyncio.sleep(0.05)
    times = [call.at for call in edits(bot_api, message_id)]
    assert 2 <= len(times) <= burst_s / 0.5 + 2, len(times)
    assert all(b - a >= 0.45 for a, b in zip(times, times[1:], strict=False)), times
    text = edits(bot_api, message_id)[-1].params["text"]
    assert "rendering, scene 1 of 2" in text and "left" in text and last


async def test_a_429_is_retried_after_retry_after(make_chat, bot_api):
    await make_chat()
    bot_api.fail("sendMessage", 429, retry_after=1)
    bot_api.user_message(ALICE, "/help")
    await bot_api.until("sendMessage", chat_id=ALICE, timeout=10)
    first, second = bot_api.attempts("sendMessage")[:2]
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0
    assert len(bot_api.sent("sendMessage", chat_id=ALICE)) == 1


# --- delivery ---------------------------------------------------------------------------------


async def test_the_progress_message_turns_into_the_video_and_nothing_comes_twice(
        make_chat, bot_api, rendered):
    chat = await make_chat()
    request, job_id, progress_id = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    bot_api.fail("sendDocument", 500)
    with pytest.raises(ChatUnavailable):
        await deliver(chat, job_id)
    [edit] = bot_api.sent("editMessageMedia")
    await deliver(chat, job_id)
    await deliver(chat, job_id)  # handed over again after a restart: nothing new
    assert len(bot_api.sent("editMessageMedia")) == 1 and bot_api.sent("sendVideo") == []
    assert len(bot_api.sent("sendDocument")) == 1

    # The progress message, a reply to the request, is now the video.
    [video] = bot_api.videos(ALICE)
    assert video["message_id"] == progress_id and "text" not in video
    assert video["reply_to_message"]["message_id"] == request["message_id"]
    assert video["caption"] == edit.params["media"]["caption"]
    media, (name, size) = edit.params["media"], upload(edit)
    assert (media["type"], media["supports_streaming"]) == ("video", True)
    assert (media["duration"], media["width"], media["height"]) == (6, 128, 96)
    assert media["parse_mode"] == "HTML"
    assert "A red fox runs through the snow" in media["caption"]
    assert "6.0 s · 2 scenes · rendered in" in media["caption"]
    assert size == (rendered / "video.mp4").stat().st_size and name == f"{job_id}.mp4"
    # The report notifies the user (the edit did not), replying to the video.
    [report] = bot_api.sent("sendDocument")
    assert report.files["document"][0].endswith(".html")
    assert report.params["reply_parameters"]["message_id"] == progress_id
    assert "is done: see above" in report.params["caption"]
    steps = json.loads((job_dir(chat.config.jobs_dir, job_id) / "chat-delivery.json").read_text())
    assert set(steps) == {"video", "notice"} and steps["video"]["edited"] is True
    assert await chat.redis.sismember(LIVE_KEY, job_id) == 0


async def test_a_crash_after_telegram_took_the_video_leaves_one_video(make_chat, bot_api,
                                                                      rendered):
    chat = await make_chat()
    _, job_id, progress_id = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    bot_api.fail("sendDocument", 500)
    with pytest.raises(ChatUnavailable):
        await deliver(chat, job_id)
    # As if the daemon had died before recording the video step, and Redis forgot the
    # job too: the progress message's id is also in the job directory.
    (job_dir(chat.config.jobs_dir, job_id) / "chat-delivery.json").unlink()
    await chat.redis.delete(job_key(job_id))
    chat.progress._live.clear()
    await deliver(chat, job_id)
    assert len(bot_api.sent("editMessageMedia", message_id=progress_id)) == 2
    assert [v["message_id"] for v in bot_api.videos(ALICE)] == [progress_id]
    assert bot_api.sent("sendVideo") == [] and len(bot_api.sent("sendDocument")) == 1


@pytest.mark.parametrize("why", ["deleted", "old server"])
async def test_a_progress_message_that_cannot_take_the_video_gets_it_as_a_new_reply(
        make_chat, bot_api, rendered, why):
    chat = await make_chat()
    request, job_id, progress_id = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    if why == "deleted":
        bot_api.delete(ALICE, progress_id)  # the user tidied up the chat
    else:  # a self-hosted Bot API server that cannot add media to a text message
        bot_api.fail("editMessageMedia", 400, reason="there is no media in the message to edit")
    await deliver(chat, job_id)
    [failed_edit] = bot_api.attempts("editMessageMedia")
    assert failed_edit.status == 400
    [video] = bot_api.sent("sendVideo")
    assert video.params["reply_parameters"]["message_id"] == request["message_id"]
    assert "6.0 s · 2 scenes" in video.params["caption"]
    assert [v["message_id"] for v in bot_api.videos(ALICE)] == [video.result["message_id"]]
    [report] = bot_api.sent("sendDocument")
    assert report.params["reply_parameters"]["message_id"] == video.result["message_id"]
    if why == "old server":  # the progress message says it is done, not "rendering 97 %"
        assert "is done" in bot_api.message(ALICE, progress_id)["text"]


@pytest.mark.parametrize("reason", ["MESSAGE_EDIT_TIME_EXPIRED", "MEDIA_EMPTY",
                                    "some refusal nobody has seen yet"])
async def test_any_refused_edit_of_the_progress_message_sends_the_video_as_a_new_reply(
        make_chat, bot_api, rendered, reason):
    chat = await make_chat()
    request, job_id, _ = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    bot_api.fail("editMessageMedia", 400, reason=reason)
    await deliver(chat, job_id)
    [video] = bot_api.sent("sendVideo")
    assert video.params["reply_parameters"]["message_id"] == request["message_id"]
    assert [v["message_id"] for v in bot_api.videos(ALICE)] == [video.result["message_id"]]
    steps = json.loads((job_dir(chat.config.jobs_dir, job_id) / "chat-delivery.json").read_text())
    assert steps["video"]["edited"] is False and "skipped" not in steps["video"]
    assert len(bot_api.sent("sendDocument")) == 1  # and the report follows it


@pytest.mark.parametrize(("status", "reason"), [(400, "chat not found"),
                                                (403, "bot was blocked by the user")])
async def test_a_video_for_a_chat_that_is_gone_is_skipped_not_retried(
        make_chat, bot_api, rendered, status, reason):
    chat = await make_chat()
    _, job_id, _ = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    bot_api.fail("editMessageMedia", status, reason=reason)
    bot_api.fail("sendVideo", status, reason=reason)
    bot_api.fail("sendMessage", status, reason=reason)
    bot_api.fail("sendDocument", status, reason=reason)
    await deliver(chat, job_id)  # no ChatUnavailable: nothing left to retry
    steps = json.loads((job_dir(chat.config.jobs_dir, job_id) / "chat-delivery.json").read_text())
    assert reason.lower() in steps["video"]["skipped"].lower()
    assert bot_api.sent("sendVideo") == [] and bot_api.videos(ALICE) == []


async def test_another_refusal_of_the_new_message_is_retried_not_skipped(
        make_chat, bot_api, rendered):
    chat = await make_chat()
    _, job_id, _ = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    bot_api.fail("editMessageMedia", 400, reason="MESSAGE_EDIT_TIME_EXPIRED")
    bot_api.fail("sendVideo", 400, reason="wrong file identifier/HTTP URL specified")
    with pytest.raises(ChatUnavailable):
        await deliver(chat, job_id)
    steps = job_dir(chat.config.jobs_dir, job_id) / "chat-delivery.json"
    assert not steps.exists() or "video" not in json.loads(steps.read_text())
    await deliver(chat, job_id)  # the delivery loop's retry: the edit works this time
    assert len(bot_api.videos(ALICE)) == 1
    assert "skipped" not in json.loads(steps.read_text())["video"]


async def test_a_result_that_is_not_a_video_turns_the_progress_message_into_a_document(
        make_chat, bot_api):
    chat = await make_chat()
    _, job_id, progress_id = await ask_for_video(bot_api)
    directory = job_dir(chat.config.jobs_dir, job_id)
    (directory / "notes.txt").write_text("scene list\n")
    JobOutcome(JobStatus.done, primary="notes.txt").write(directory)  # and no report
    await chat.queue.finish(job_id, JobStatus.done)
    await deliver(chat, job_id)
    [edit] = bot_api.sent("editMessageMedia")
    assert edit.params["media"]["type"] == "document" and upload(edit) == ("notes.txt", 11)
    result = bot_api.message(ALICE, progress_id)
    assert result["document"]["file_name"] == "notes.txt" and job_id in result["caption"]
    assert bot_api.sent("sendDocument") == []
    # Without a report, a short line tells the user, as a reply to the result.
    notice = bot_api.sent("sendMessage", chat_id=ALICE)[-1].params
    assert "is done: see above" in notice["text"]
    assert notice["reply_parameters"]["message_id"] == progress_id


async def test_an_outage_delays_the_video_but_it_arrives_once(make_chat, bot_api, rendered):
    chat = await make_chat()
    _, job_id, _ = await ask_for_video(bot_api)
    loop = DeliveryLoop(chat.config, chat.queue)
    loop.register(Channel.chat, chat.deliver)
    stop = asyncio.Event()
    delivering = asyncio.create_task(loop.run(stop))
    try:
        bot_api.go_down()
        await finish_like_a_worker(chat, job_id, rendered)
        while not loop.failures.get(job_id):
            await asyncio.sleep(0.05)
        bot_api.come_back()
        await bot_api.until("editMessageMedia", timeout=20)
        await bot_api.until("sendDocument")
        await asyncio.sleep(1)
    finally:
        stop.set()
        await delivering
    assert len(bot_api.sent("editMessageMedia")) == 1 and len(bot_api.videos(ALICE)) == 1
    assert len(bot_api.sent("sendDocument")) == 1


async def test_a_video_over_the_upload_limit_is_reencoded_to_fit(make_chat, bot_api, loud):
    chat = await make_chat(max_upload_mb=0.3)
    limit = int(0.3 * 1024 * 1024)
    original = (loud / "video.mp4").stat().st_size
    assert original > limit
    # …and the server turns away even less than the config says it takes.
    bot_api.max_upload_bytes = limit - 64 * 1024
    _, job_id, _ = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, loud)
    await deliver(chat, job_id)
    [refused] = [c for c in bot_api.attempts("editMessageMedia") if c.status == 413]
    [video] = bot_api.sent("editMessageMedia")
    name, size = upload(video)
    assert size <= bot_api.max_upload_bytes < upload(refused)[1]
    caption = video.params["media"]["caption"]
    assert "Re-encoded to" in caption and "upload limit" in caption
    small = job_dir(chat.config.jobs_dir, job_id) / chat_delivery.SMALL_VIDEO
    assert small.stat().st_size == size
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(small))
    assert abs(seconds - 6) < 0.3 and frames >= 40


async def test_a_reencoded_video_keeps_its_sound(make_chat, bot_api, loud, tmp_path):
    chat = await make_chat(max_upload_mb=0.3)
    _, job_id, _ = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, loud)
    await deliver(chat, job_id)
    [video] = bot_api.sent("editMessageMedia")
    assert "Re-encoded to" in video.params["media"]["caption"]
    # What Telegram got, not what the daemon kept: an AAC track, and the tone plays.
    [received] = video.uploaded.values()
    assert len(received) <= int(0.3 * 1024 * 1024) < (loud / "video.mp4").stat().st_size
    copy = tmp_path / "received.mp4"
    copy.write_bytes(received)
    assert [s.codec for s in encoding.probe(copy).of_kind("audio")] == ["aac"]
    assert np.sqrt(np.mean(encode.audio_samples(copy) ** 2)) > 0.05  # lavfi sine: 1/8 peak


async def test_a_video_that_cannot_be_made_to_fit_says_why(make_chat, bot_api, rendered):
    chat = await make_chat(max_upload_mb=0.008)  # 8 kB for 6 s: no picture left
    _, job_id, progress_id = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    await deliver(chat, job_id)
    assert bot_api.videos(ALICE) == [] and bot_api.sent("editMessageMedia") == []
    text = bot_api.message(ALICE, progress_id)["text"]
    assert "could not be made to fit" in text
    assert "the upload limit is too small for a 6 s video" in text


async def test_with_a_public_url_a_large_video_comes_as_a_working_link(make_chat, bot_api,
                                                                       rendered):
    chat = await make_chat(max_upload_mb=0.008, public_base_url='"https://reel.example/"')
    request, job_id, progress_id = await ask_for_video(bot_api)
    await finish_like_a_worker(chat, job_id, rendered)
    await deliver(chat, job_id)
    assert bot_api.videos(ALICE) == []
    text = bot_api.message(ALICE, progress_id)["text"]  # the progress message says it
    assert "link instead" in text
    url = text.split("https://reel.example")[1].split()[0].replace("&amp;", "&")
    api = HttpApi(chat.config, submitter_for(chat.config, chat.queue))
    async with TestClient(TestServer(api.app())) as http:
        response = await http.get(url)
        assert response.status == 200
        assert await response.read() == (rendered / "video.mp4").read_bytes()


async def test_a_failure_is_explained_in_plain_words(make_chat, bot_api):
    chat = await make_chat()
    request, job_id, progress_id = await ask_for_video(bot_api)
    error = "the font fonts/missing.ttf does not exist; fix [video] font"
    JobOutcome(JobStatus.failed, error=error).write(job_dir(chat.config.jobs_dir, job_id))
    await chat.queue.finish(job_id, JobStatus.failed, error)
    await deliver(chat, job_id)
    answer = bot_api.sent("sendMessage", chat_id=ALICE)[-1].params
    assert "failed" in answer["text"] and error in answer["text"]
    assert "Traceback" not in answer["text"]
    assert answer["reply_parameters"]["message_id"] == request["message_id"]
    assert error in bot_api.message(ALICE, progress_id)["text"]


async def test_the_token_is_taken_out_of_library_log_records(tmp_path, redis_url, caplog):
    config = read_config(write_config(tmp_path, redis_url, **{"intake.chat": (
        f'enabled = true\ntoken = "{TOKEN}"')}))
    queue = await QueueClient.open(config.redis.url)
    chat = ChatIntake(config, submitter_for(config, queue))
    chat._install_log_filter()
    try:
        with caplog.at_level(logging.WARNING):
            logging.getLogger("httpx").warning("HTTP Request: POST %s/getMe",
                                               f"https://api.telegram.org/bot{TOKEN}")
            try:
                raise RuntimeError(f"The token `{TOKEN}` was rejected by the server.")
            except RuntimeError:
                logging.getLogger("telegram.ext.Updater").exception("polling failed")
    finally:
        chat._remove_log_filter()
        await queue.close()
    assert "bot<bot-token>/getMe" in caplog.text
    assert TOKEN not in caplog.text
    assert all(TOKEN not in (record.exc_text or "") for record in caplog.records)


# --- end to end: the real daemon and worker -----------------------------------------


def stack_config(tmp_path: Path, redis_url: str, api: FakeBotApi) -> Path:
    return write_config(tmp_path, redis_url,
                        video="width = 480\nheight = 272\nfps = 16\nscene_seconds = 3",
                        **{"intake.chat": chat_section(api)})


def test_end_to_end_a_video_from_chat(tmp_path, redis_url, bot_api, spawn):
    stack_config(tmp_path, redis_url, bot_api)
    daemon = spawn("daemon")
    spawn("worker")
    wait_for(lambda: "chat bot connected" in daemon.log(), timeout=90, what="the bot")
    request = bot_api.user_message(ALICE, "/video A red fox runs through the snow. It stops. "
                                          "It listens. It looks back at the camera. Night falls.")
    reply = bot_api.wait_for("sendMessage", chat_id=ALICE)[0]
    text = reply.params["text"]
    assert "is queued" in text and "position" in text
    job_id = text.split("<code>")[1].split("</code>")[0]
    progress_id = reply.result["message_id"]

    bot_api.wait_for("editMessageMedia", timeout=60, message_id=progress_id)
    bot_api.wait_for("sendDocument", timeout=20)
    [video] = bot_api.videos(ALICE)  # the progress message, turned into the video
    assert video["message_id"] == progress_id
    assert video["reply_to_message"]["message_id"] == request["message_id"]
    report = json.loads((tmp_path / "var" / "jobs" / job_id / "report.json").read_text())
    assert (video["video"]["width"], video["video"]["height"], video["video"]["duration"]) == (
        480, 272, round(report["output"]["duration_s"]))
    assert "A red fox runs through the snow" in video["caption"] and job_id in video["caption"]
    progress = [c.params["text"] for c in bot_api.sent("editMessageText", message_id=progress_id)]
    assert any("%" in text for text in progress), progress
    assert (tmp_path / "var" / "jobs" / job_id / "chat-delivery.json").exists()

    bot_api.user_message(STRANGER, "/video let me in")
    bot_api.wait_for("sendMessage", chat_id=STRANGER)
    for command, expected in (("/status", "is done"), ("/queue", "0 waiting"),
                              ("/gpu", "test-worker"), ("/help", "/storyboard")):
        count = len(bot_api.sent("sendMessage", chat_id=ALICE))
        bot_api.user_message(ALICE, command)
        answer = bot_api.wait_for("sendMessage", count + 1, chat_id=ALICE)[-1].params["text"]
        assert expected in answer, (command, answer)
    daemon.stop()
    log = daemon.log()
    assert f'"user_id": {STRANGER}' in log and f'"chat_id": {STRANGER}' in log
    assert TOKEN not in log and TOKEN.split(":")[1] not in log


def test_end_to_end_an_outage_and_a_killed_daemon_deliver_exactly_once(tmp_path, redis_url,
                                                                        bot_api, spawn):
    stack_config(tmp_path, redis_url, bot_api)
    daemon = spawn("daemon")
    spawn("worker")
    wait_for(lambda: "chat bot connected" in daemon.log(), timeout=90, what="the bot")
    bot_api.user_message(ALICE, "/video a red fox in the snow")
    reply = bot_api.wait_for("sendMessage", chat_id=ALICE)[0]
    job_id = reply.params["text"].split("<code>")[1].split("</code>")[0]
    bot_api.go_down()  # Telegram is unreachable when the video is ready
    job = tmp_path / "var" / "jobs" / job_id
    wait_for(lambda: (job / "result.json").exists(), timeout=60, what="the job to finish")
    wait_for(lambda: "delivery failed; will retry" in daemon.log(), timeout=20,
             what="a failed delivery")
    daemon.kill()  # SIGKILL with the delivery pending
    assert bot_api.videos(ALICE) == []
    bot_api.come_back()
    daemon = spawn("daemon")
    bot_api.wait_for("editMessageMedia", timeout=30)
    bot_api.wait_for("sendDocument", timeout=20)
    time.sleep(1.5)  # anything sent twice would show up now
    [video] = bot_api.videos(ALICE)
    assert video["message_id"] == reply.result["message_id"]
    assert len(bot_api.sent("editMessageMedia")) == 1 and bot_api.sent("sendVideo") == []
    assert len(bot_api.sent("sendDocument")) == 1
    assert daemon.stop() == 0
    assert TOKEN not in daemon.log()


async def test_the_morning_digest_summary_is_posted_once_even_through_an_outage(
        make_chat, bot_api):
    from daemon import outbox

    chat = await make_chat()
    bot_api.go_down()
    summary = "Last 24 h: 12 jobs, 11 done, 1 failed <see the digest>"
    await outbox.leave(chat.redis, "chat", str(GROUP), summary)
    key = outbox.outbox_key("chat")
    await asyncio.sleep(2)  # it is tried, fails, and waits in Redis
    assert not bot_api.sent("sendMessage", chat_id=GROUP)
    assert await chat.redis.llen(key) == 1
    bot_api.come_back()
    posted = await bot_api.until("sendMessage", timeout=20, chat_id=GROUP)
    assert posted[0].params["text"] == summary.replace("<", "&lt;").replace(">", "&gt;")
    await asyncio.sleep(1.5)
    assert len(bot_api.sent("sendMessage", chat_id=GROUP)) == 1
    assert await chat.redis.llen(key) == 0
    assert await chat.redis.llen(key + ":active") == 0
