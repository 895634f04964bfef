"""One submission path: the same requests through the drop folder, HTTP, chat (fake Bot
API) and the CLI get the same outcome, each answered in the sender's own channel; caps
hold under parallel requests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon import caps, cli
from daemon.compose import read_config
from daemon.config import Config
from daemon.jobs import Source
from daemon.queue import QueueClient
from daemon.submit import Refusal, Refused, Request, Upload
from intake.folder import FolderIntake
from intake.http import HttpApi
from intake.telegram.asks import Ask
from intake.telegram.bot import ChatIntake
from tests.conftest import submitter_for, write_config
from tests.fake_bot_api import FakeBotApi
from tests.test_chat import ALICE, chat_section

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")]

TOKEN = {"Authorization": "Bearer t"}


@dataclass
class Answer:
    queued: bool
    reply: str  # what the sender saw, in that channel's own form
    job_id: str | None = None


Sender = Callable[[str, dict], Awaitable[Answer]]


@dataclass
class Channel:
    name: str
    config: Config
    queue: QueueClient
    send: Sender


def tables(channel: str, api: FakeBotApi) -> dict[str, str]:
    """One submitter may have one job queued; everybody together two; no fox."""
    queue = ('max_queued = 2\nmax_queued_per_submitter = 1\n'
             'blocklist = ["\\\\bfox(es)?\\\\b"]')
    extra = {"http": {"intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "lab"\n'
                                     'token = "t"'},
             "chat": {"intake.chat": chat_section(api, max_queued_per_user=0)}}
    return {"queue": queue, **extra.get(channel, {})}


@contextlib.asynccontextmanager
async def channel(name: str, tmp_path: Path, redis_url: str, api: FakeBotApi
                  ) -> AsyncIterator[Channel]:
    config = read_config(write_config(tmp_path, redis_url, **tables(name, api)))
    queue = await QueueClient.open(config.redis.url)
    submitter = submitter_for(config, queue)
    try:
        if name == "folder":
            yield Channel(name, config, queue, folder_sender(config, submitter))
        elif name == "http":
            async with TestClient(TestServer(HttpApi(config, submitter).app())) as client:
                yield Channel(name, config, queue, http_sender(client))
        elif name == "chat":
            chat = ChatIntake(config, submitter)
            await chat.start()
            await asyncio.wait_for(chat.ready.wait(), 10)
            try:
                yield Channel(name, config, queue, chat_sender(chat, api))
            finally:
                await chat.stop()
        else:
            yield Channel(name, config, queue, cli_sender(config))
    finally:
        await queue.close()


def folder_sender(config: Config, submitter) -> Sender:
    intake = FolderIntake(config.intake.folder[0], config, submitter)
    inbox = config.intake.folder[0].path
    (inbox / "failed").mkdir(parents=True, exist_ok=True)

    async def send(prompt: str, options: dict) -> Answer:
        # The same prompt and options are the same file: a duplicate drop.
        name = f"req-{abs(hash((prompt, json.dumps(options, sort_keys=True)))) % 10**8}.json"
        (inbox / name).write_text(json.dumps({"prompt": prompt, **options}))
        job_id = await intake.take(inbox / name)
        error = inbox / "failed" / name.replace(".json", ".error.txt")
        if job_id is not None:
            return Answer(True, "queued", job_id)
        if error.exists():
            return Answer(False, error.read_text())
        assert (inbox / name).exists()  # not refused: waiting in the inbox for room
        return Answer(False, "waits in the inbox")

    return send


def http_sender(client: TestClient) -> Sender:
    async def send(prompt: str, options: dict) -> Answer:
        # The same prompt and options carry the same Idempotency-Key: a retried POST.
        key = json.dumps([prompt, options], sort_keys=True)
        response = await client.post("/jobs", json={"prompt": prompt, "options": options},
                                     headers={**TOKEN, "Idempotency-Key": key})
        body = await response.json()
        if response.status == 202:
            return Answer(True, str(response.status), body["id"])
        return Answer(False, f"{response.status} {body['error']['message']}")

    return send


def chat_sender(chat: ChatIntake, api: FakeBotApi) -> Sender:
    message_ids: dict[str, int] = {}

    async def send(prompt: str, options: dict) -> Answer:
        # The same request is the same chat message: an update fetched again.
        key = json.dumps([prompt, options], sort_keys=True)
        message_id = message_ids.setdefault(key, 9000 + len(message_ids))
        before = len(api.sent("sendMessage", chat_id=ALICE))
        await chat.submissions.submit(Ask(ALICE, ALICE, message_id), "video", prompt,
                                      options=options)
        text = (await api.until("sendMessage", before + 1, chat_id=ALICE))[-1].params["text"]
        if "is queued" in text:
            return Answer(True, text, text.split("<code>")[1].split("</code>")[0])
        return Answer(False, text)

    return send


def cli_sender(config: Config) -> Sender:
    async def send(prompt: str, options: dict) -> Answer:
        key = json.dumps([prompt, options], sort_keys=True)
        argv = ["--config", str(config.source_path), "submit", prompt, "--key", key]
        for name, value in options.items():
            argv += ["-o", f"{name}={json.dumps(value)}"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = await asyncio.to_thread(cli.main, argv)
        if status == 0:
            return Answer(True, out.getvalue(), out.getvalue().split("job ")[1].split()[0])
        return Answer(False, err.getvalue())

    return send


def job_folders(config: Config) -> list[str]:
    jobs = config.jobs_dir
    return sorted(p.name for p in jobs.iterdir()) if jobs.exists() else []


@pytest.mark.parametrize("name", ["folder", "http", "chat", "cli"])
async def test_every_channel_gets_the_same_answers(name, tmp_path, redis_url):
    with FakeBotApi() as api:
        async with channel(name, tmp_path, redis_url, api) as ch:
            # Refused for a bad option, naming it; nothing written.
            bad = await ch.send("a quiet owl", {"fps": 0})
            assert not bad.queued and "fps" in bad.reply
            # Refused by the content rule at once, not queued to fail later.
            blocked = await ch.send("two foxes fight", {})
            assert not blocked.queued and "content rule" in blocked.reply
            assert job_folders(ch.config) == [] and await ch.queue.queue_length() == 0

            first = await ch.send("a quiet owl", {"duration": 6})
            assert first.queued
            # The same request again collapses into the first job.
            again = await ch.send("a quiet owl", {"duration": 6})
            assert job_folders(ch.config) == [first.job_id]
            assert await ch.queue.queue_length() == 1
            assert again.job_id in (first.job_id, None)

            # This submitter's cap (one queued): refused, or waiting in the folder.
            capped = await ch.send("a quiet heron", {})
            assert not capped.queued
            assert ("1 jobs queued" in capped.reply or "1 jobs queued or running" in
                    capped.reply or "already have 1 jobs" in capped.reply
                    or capped.reply == "waits in the inbox")
            assert job_folders(ch.config) == [first.job_id]

            # Everybody's cap (two waiting): someone else's job fills the queue.
            await ch.queue.redis.zadd("arq:queue", {"someone-else": 1})
            await ch.queue.redis.delete(f"reelqueue:active:{submitter_of(name, ch)}")
            full = await ch.send("a quiet crane", {})
            assert not full.queued
            assert "queue is full" in full.reply or full.reply == "waits in the inbox"
            assert job_folders(ch.config) == [first.job_id]  # nothing left on disk


def submitter_of(name: str, ch: Channel) -> str:
    """Who the channel says sent the requests (the caps' key)."""
    if name == "http":
        return "lab"
    if name == "chat":
        return f"tg:{ALICE}"
    return cli._user()


async def test_parallel_posts_cannot_pass_a_cap_together(tmp_path, redis_url):
    config = read_config(write_config(tmp_path, redis_url, **{
        "intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "lab"\ntoken = "t"\n'
                       "max_queued = 3"}))
    queue = await QueueClient.open(config.redis.url)
    await queue.pause(by="test")  # no worker would start one anyway: nothing frees a place
    api = HttpApi(config, submitter_for(config, queue))
    try:
        async with TestClient(TestServer(api.app())) as client:
            responses = await asyncio.gather(*(
                client.post("/jobs", json={"prompt": f"owl {n}"}, headers=TOKEN)
                for n in range(20)))
            statuses = sorted(response.status for response in responses)
        assert statuses == [202] * 3 + [429] * 17
        assert await queue.queue_length() == 3
        assert len(job_folders(config)) == 3
    finally:
        await queue.close()


async def test_a_kind_whose_model_is_missing_is_refused_at_once(tmp_path, redis_url):
    """Not accepted and left to fail in the worker: the sender hears what to install."""
    config = read_config(write_config(tmp_path, redis_url, **{
        "intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "lab"\ntoken = "t"',
        "caption": f'model = "{tmp_path / "models" / "git-base-vatex"}"'}))
    queue = await QueueClient.open(config.redis.url)
    api = HttpApi(config, submitter_for(config, queue))
    try:
        async with TestClient(TestServer(api.app())) as client:
            for kind, says in (("upscale", "no upscaling model configured"),
                               ("caption", "is not a model folder")):
                form = aiohttp.FormData({"kind": kind})
                form.add_field("file", b"\x89PNG" if kind == "upscale" else b"\0\0",
                               filename="in.png" if kind == "upscale" else "in.mp4")
                response = await client.post("/jobs", data=form, headers=TOKEN)
                message = (await response.json())["error"]["message"]
                assert response.status == 422 and says in message, message
                assert "fetch_models.py" in message
        assert job_folders(config) == [] and await queue.queue_length() == 0
    finally:
        await queue.close()


async def test_parallel_posts_from_many_tokens_cannot_pass_the_global_cap(tmp_path, redis_url):
    tokens = "\n".join(f'[[intake.http.tokens]]\nname = "t{n}"\ntoken = "secret-{n}"'
                       for n in range(10))
    config = read_config(write_config(tmp_path, redis_url, queue="max_queued = 3", **{
        "intake.http": f"enabled = true\n{tokens}"}))
    queue = await QueueClient.open(config.redis.url)
    api = HttpApi(config, submitter_for(config, queue))
    try:
        async with TestClient(TestServer(api.app())) as client:
            responses = await asyncio.gather(*(
                client.post("/jobs", json={"prompt": f"owl {n}"},
                            headers={"Authorization": f"Bearer secret-{n}"})
                for n in range(10)))
        assert sorted(r.status for r in responses) == [202] * 3 + [503] * 7
        assert await queue.queue_length() == 3 and len(job_folders(config)) == 3
    finally:
        await queue.close()


async def test_one_idempotency_key_sent_in_parallel_makes_one_job(tmp_path, redis_url):
    config = read_config(write_config(tmp_path, redis_url, **{
        "intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "lab"\ntoken = "t"'}))
    queue = await QueueClient.open(config.redis.url)
    api = HttpApi(config, submitter_for(config, queue))
    headers = {**TOKEN, "Idempotency-Key": "night-batch-17"}
    try:
        async with TestClient(TestServer(api.app())) as client:
            responses = await asyncio.gather(*(
                client.post("/jobs", json={"prompt": "a patient heron"}, headers=headers)
                for _ in range(5)))
            assert [r.status for r in responses] == [202] * 5
            ids = {(await r.json())["id"] for r in responses}
            assert len(ids) == 1 and job_folders(config) == sorted(ids)
            assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 4
            # The same key for another request is a mistake, said as one.
            other = await client.post("/jobs", json={"prompt": "a quick fox"}, headers=headers)
            assert other.status == 422
            assert "Idempotency-Key" in (await other.json())["error"]["message"]
        assert await queue.queue_length() == 1
    finally:
        await queue.close()


async def test_input_names_stay_inside_the_job_folder(config, redis_url):
    queue = await QueueClient.open(redis_url)
    submitter = submitter_for(config, queue)

    def request(*names: str) -> Request:
        return Request(kind="long_exposure", prompt="", options={},
                       source=Source(channel="cli"), submitted_by="ann",
                       inputs=tuple(Upload.of_bytes(name, b"x") for name in names))

    try:
        for names in (("../escape.png",), ("/etc/escape.png",), ("a.png", "a.png")):
            answer = await submitter.submit(request(*names))
            assert isinstance(answer, Refused) and answer.why == Refusal.invalid, names
        assert job_folders(config) == [] and not (config.jobs_dir.parent / "escape.png").exists()
    finally:
        await queue.close()


async def test_a_place_given_back_after_midnight_leaves_no_negative_count(redis_url):
    queue = await QueueClient.open(redis_url)
    try:
        place = await caps.reserve(queue.redis, "job1", "ann", 0, 5, 0)
        assert place.taken
        await queue.redis.delete(place.daily_key)  # the day ended, its counter expired
        await caps.give_back(queue.redis, place)
        assert await queue.redis.exists(place.daily_key) == 0
        assert await queue.redis.zcard(caps.active_key("ann")) == 0
    finally:
        await queue.close()


async def test_the_cli_never_hides_a_word_in_brackets(tmp_path, redis_url):
    """Messages name config tables in brackets; rich must not take them for markup."""
    config_file = write_config(tmp_path, redis_url)
    queue = await QueueClient.open(redis_url)
    error = "no upscaling model is configured: set [upscale] model, see [models] dir"
    try:
        await queue.redis.hset("reelqueue:job:abc123", mapping={
            "id": "abc123", "kind": "upscale", "status": "failed", "stage": "failed",
            "percent": "0", "error": error, "submitted_by": "ann", "created_at": "0"})
        await queue.redis.zadd("reelqueue:recent", {"abc123": 0})
    finally:
        await queue.close()
    # (the jobs table wraps its narrow column: only the first name is on one line there)
    for argv, tables in ((["status", "abc123"], ("[upscale]", "[models]")),
                         (["jobs"], ("[upscale]",))):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert await asyncio.to_thread(cli.main, ["--config", str(config_file), *argv]) == 0
        for table in tables:
            assert table in out.getvalue(), (argv, out.getvalue())


async def test_a_submission_lock_left_by_a_killed_daemon_lapses(config, redis_url):
    """A daemon SIGKILLed mid-submission leaves the id's lock; the next try waits for it to
    lapse (its holder renews it only while alive) instead of refusing for long."""
    queue = await QueueClient.open(redis_url)
    try:
        await queue.redis.set("reelqueue:submitting:fromakilleddaemon", "dead", px=400)
        answer = await submitter_for(config, queue).submit(Request(
            kind="video", prompt="a patient heron", options={}, submitted_by="ann",
            source=Source(channel="cli"), job_id="fromakilleddaemon"))
        assert not isinstance(answer, Refused) and answer.spec.id == "fromakilleddaemon"
    finally:
        await queue.close()
