"""Queue policy and operational guarantees: durable acknowledgement, the queue cap with
backpressure, pause and resume, the disk floor, and content rules."""

from __future__ import annotations

import time

import pytest
import redis as redis_sync
from aiohttp.test_utils import TestClient, TestServer

from daemon.compose import config_class, read_config
from daemon.config import QueueConfig, StateConfig
from daemon.jobs import Channel, JobSpec, Source, new_job_id, write_spec
from daemon.queue import QueueClient
from daemon.redis_server import EmbeddedRedis
from daemon.schedule import PARKED_BASE_MS
from daemon.submit import Accepted, Refusal, Refused, Request, Submitter
from intake.folder import FolderIntake
from intake.http import HttpApi
from tests.conftest import submitter_for, wait_for, write_config
from workers.pipelines import kind_registry
from workers.runner import run_job_sync
from workers.worker import low_disk_space

Config = config_class()  # the core's tables and the kinds'

pytestmark = pytest.mark.timeout(120)


def spec(prompt: str = "a red fox", **options) -> JobSpec:
    return JobSpec(id=new_job_id(), kind="video", prompt=prompt, options=options,
                   source=Source(channel="cli"))


def test_the_embedded_redis_fsyncs_before_acknowledging(tmp_path):
    server = EmbeddedRedis(tmp_path / "state")
    server.start()
    try:
        with redis_sync.Redis(unix_socket_path=str(server.socket)) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
            assert client.config_get("appendonly") == {"appendonly": "yes"}
        # A restart with "everysec" applies it to the server that is still running.
        EmbeddedRedis(tmp_path / "state", "everysec").start()
        with redis_sync.Redis(unix_socket_path=str(server.socket)) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        server.stop(only_if_idle=False)


async def test_the_queue_cap_refuses_with_a_clear_answer(config, redis_url):
    queue = await QueueClient.open(redis_url)
    config.queue.max_queued = 2
    submitter = Submitter(config, queue, kind_registry())

    def request() -> Request:
        return Request(kind="video", prompt="a fox", options={},
                       source=Source(channel=Channel.cli), submitted_by="ann")

    try:
        for _ in range(2):
            assert isinstance(await submitter.submit(request()), Accepted)
        refused = await submitter.submit(request())
        assert isinstance(refused, Refused) and refused.why == Refusal.queue_full
        assert "queue is full (2 jobs waiting, the limit is 2)" in refused.message
        assert await queue.queue_length() == 2
        assert len(list(config.jobs_dir.iterdir())) == 2  # nothing written for the third
    finally:
        await queue.close()


async def test_http_answers_503_when_full_and_the_folder_waits(tmp_path, redis_url):
    config = read_config(write_config(tmp_path, redis_url, **{
        "intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "a"\ntoken = "t"',
        "queue": "max_queued = 1"}))
    queue = await QueueClient.open(redis_url)
    api = HttpApi(config, submitter_for(config, queue))
    async with TestClient(TestServer(api.app())) as client:
        headers = {"Authorization": "Bearer t"}
        first = await client.post("/jobs", json={"prompt": "a fox"}, headers=headers)
        assert first.status == 202
        full = await client.post("/jobs", json={"prompt": "a fox"}, headers=headers)
        assert full.status == 503
        assert "the queue is full" in (await full.json())["error"]["message"]

        folder = config.intake.folder[0]
        intake = FolderIntake(folder, config, submitter_for(config, queue))
        await intake.start()
        try:
            (folder.path / "waiting.txt").write_text("a patient fox")
            time.sleep(1.5)
            await intake.take(folder.path / "waiting.txt")
            assert (folder.path / "waiting.txt").exists()  # kept in the inbox, not refused
            assert not list((folder.path / "failed").iterdir())
            assert folder.path / "waiting.txt" not in intake.taken  # offered again later
        finally:
            await intake.stop()
    await queue.close()


async def test_pause_and_resume_need_an_admin_token(tmp_path, redis_url):
    config = read_config(write_config(tmp_path, redis_url, **{
        "intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "u"\ntoken = "user"\n'
                       '[[intake.http.tokens]]\nname = "boss"\ntoken = "admin"\nrole = "admin"'}))
    queue = await QueueClient.open(redis_url)
    api = HttpApi(config, submitter_for(config, queue))
    async with TestClient(TestServer(api.app())) as client:
        denied = await client.post("/admin/pause", headers={"Authorization": "Bearer user"})
        assert denied.status == 403
        paused = await client.post("/admin/pause", json={"reason": "driver upgrade"},
                                   headers={"Authorization": "Bearer admin"})
        assert (await paused.json())["paused"]["reason"] == "driver upgrade"
        health = await (await client.get("/healthz")).json()
        assert health["paused"]["by"] == "boss"
        await client.post("/admin/resume", headers={"Authorization": "Bearer admin"})
        assert await queue.paused() is None
    await queue.close()


def test_a_paused_worker_finishes_nothing_new_until_resumed(config_file, spawn):
    from tests.test_stack import drop, inbox_of, run_cli

    spawn("daemon")
    spawn("worker")
    assert run_cli(config_file, "pause", "--reason", "maintenance").returncode == 0
    time.sleep(4)  # the worker sees the pause at its next heartbeat
    inbox = inbox_of(config_file)
    drop(inbox, "later.txt", b"a red fox, after the maintenance")
    time.sleep(5)
    assert not (inbox / "done" / "later.mp4").exists()
    status = run_cli(config_file, "status").stdout
    assert "paused" in status and "maintenance" in status
    assert run_cli(config_file, "resume").returncode == 0
    wait_for(lambda: (inbox / "done" / "later.mp4").exists(), timeout=60, what="the job")


def test_jobs_are_held_while_the_disk_is_nearly_full(tmp_path, redis_url, spawn):
    from tests.test_stack import drop, inbox_of, run_cli

    config_file = write_config(tmp_path, redis_url, queue="min_free_gb = 1000000")
    spawn("daemon")
    for name in ("one", "two", "three"):
        drop(inbox_of(config_file), f"{name}.txt", f"a {name} fox on a full disk".encode())
    jobs = tmp_path / "var" / "jobs"
    wait_for(lambda: len(list(jobs.glob("*/spec.json"))) == 3, what="the jobs")
    spawn("worker")

    with redis_sync.Redis.from_url(redis_url) as client:
        def holds() -> list[str]:
            return [job.name for job in jobs.iterdir()
                    if client.hget(f"reelqueue:job:{job.name}", "stage") == b"held"]

        wait_for(holds, timeout=30, what="the hold")
        time.sleep(2)  # the worker polls every 50 ms: time enough to cascade, if it did
        assert len(holds()) == 1  # the next job would be held too: it is not tried yet
        # Back in its place among the parked jobs, not left due to run in a loop.
        assert all(score >= PARKED_BASE_MS for _, score in
                   client.zrange("arq:queue", 0, -1, withscores=True))
        assert client.hlen("reelqueue:parked") == 3
    held = holds()[0]
    assert "held:" in run_cli(config_file, "status", held).stdout
    assert not (jobs / held / "log.jsonl").exists()  # never started


def test_low_disk_message_names_the_folder_and_the_setting(tmp_path):
    config = Config(state=StateConfig(dir=tmp_path / "var"), queue=QueueConfig(min_free_gb=1e9))
    message = low_disk_space(config, spec())
    assert "below [queue] min_free_gb = 1e+09" in message and str(tmp_path) in message
    config = Config(state=StateConfig(dir=tmp_path / "var"), queue=QueueConfig(min_free_gb=0))
    assert low_disk_space(config, spec()) == ""


async def test_content_rules_refuse_at_submission(config, redis_url):
    queue = await QueueClient.open(redis_url)
    config.queue.blocklist = [r"\bfox(es)?\b"]
    submitter = Submitter(config, queue, kind_registry())

    async def submit(prompt: str, **options) -> Accepted | Refused:
        return await submitter.submit(Request(kind="video", prompt=prompt, options=options,
                                              source=Source(channel=Channel.cli),
                                              submitted_by="ann"))

    try:
        blocked = await submit("A red FOX runs.")
        assert isinstance(blocked, Refused) and blocked.why == Refusal.blocked
        assert "matches this server's content rule" in blocked.message
        # Text inside the options counts as much as the prompt.
        sneaky = await submit("a quiet animal", duration=3,
                              scenes=[{"description": "two foxes fight", "duration_s": 3}])
        assert isinstance(sneaky, Refused) and sneaky.why == Refusal.blocked
        assert await queue.queue_length() == 0 and not config.jobs_dir.exists()
        assert isinstance(await submit("a quiet owl"), Accepted)
    finally:
        await queue.close()


def test_the_worker_checks_what_only_it_sees(tmp_path):
    """A storyboard exists only in the worker: a spec that reached it anyway (written
    before the rule existed, say) is checked there."""
    config = Config(state=StateConfig(dir=tmp_path / "var"),
                    queue=QueueConfig(blocklist=[r"\bfox(es)?\b"]))
    sneaky = spec("a quiet animal", duration=3,
                  scenes=[{"description": "two foxes fight", "duration_s": 3}])
    write_spec(config.jobs_dir, sneaky)
    outcome = run_job_sync(sneaky, config)
    assert outcome.status == "failed" and "storyboard matches" in outcome.error


def test_a_bad_blocklist_pattern_is_a_config_error(tmp_path):
    from daemon.config import ConfigError

    with pytest.raises(ConfigError, match="is not a regular expression"):
        read_config(write_config(tmp_path, "", queue='blocklist = ["(unclosed"]'))


async def test_http_tokens_have_queued_and_daily_caps(tmp_path, redis_url):
    config = read_config(write_config(tmp_path, redis_url, **{
        "intake.http": 'enabled = true\n[[intake.http.tokens]]\nname = "lab"\ntoken = "t"\n'
                       "max_queued = 2\nmax_jobs_per_day = 3"}))
    queue = await QueueClient.open(redis_url)
    api = HttpApi(config, submitter_for(config, queue))
    async with TestClient(TestServer(api.app())) as client:
        headers = {"Authorization": "Bearer t"}

        async def post():
            return await client.post("/jobs", json={"prompt": "a fox"}, headers=headers)

        first, second = await post(), await post()
        assert (first.status, second.status) == (202, 202)
        capped = await post()
        assert capped.status == 429
        assert "you have 2 jobs queued or running" in (await capped.json())["error"]["message"]
        await client.delete(f"/jobs/{(await first.json())['id']}", headers=headers)
        assert (await post()).status == 202  # room again: that is the third today
        await client.delete(f"/jobs/{(await second.json())['id']}", headers=headers)
        daily = await post()
        assert daily.status == 429
        assert "used your 3 jobs for today; the cap resets at midnight UTC" in \
            (await daily.json())["error"]["message"]
    await queue.close()
