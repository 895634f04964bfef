"""Outages that need no human: an embedded Redis that dies is started again (by
``reelqueue up`` and by the daemon), and a job that fills the disk says so plainly.
The same with real processes and a real full disk: tests/fault/test_redis_restart.py
and tests/fault/test_disk_full.py."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal

import pytest
import redis as redis_sync
from redis.exceptions import ConnectionError as RedisConnectionError

from daemon import service
from daemon.compose import read_config
from daemon.delivery import DeliveryLoop
from daemon.encoding import FFmpegError
from daemon.jobs import JobError
from daemon.queue import DELIVERIES_ACTIVE_KEY, DELIVERIES_KEY, QueueClient
from daemon.redis_server import EmbeddedRedis
from daemon.supervisor import Supervisor
from intake.folder import FolderIntake
from tests.conftest import submitter_for, wait_for, write_config
from workers.runner import disk_full_reason

pytestmark = pytest.mark.timeout(60)


def kill(server: EmbeddedRedis) -> None:
    """SIGKILL the server as the OOM killer would: no AOF rewrite, no socket removed."""
    os.kill(int((server.dir / "redis.pid").read_text()), signal.SIGKILL)
    wait_for(lambda: not server.listening(), timeout=5, what="redis-server gone")


def test_the_supervisor_restarts_a_killed_embedded_redis_on_its_aof(tmp_path):
    supervisor = Supervisor(read_config(write_config(tmp_path)), None)
    supervisor.children = []  # no daemon to revive Redis: only the supervisor can
    supervisor.start()
    try:
        assert supervisor.redis is not None
        with redis_sync.Redis.from_url(supervisor.redis.url) as client:
            client.set("reelqueue:kept", "a queued job")
        kill(supervisor.redis)
        supervisor.check()
        with redis_sync.Redis.from_url(supervisor.redis.url) as client:
            assert client.get("reelqueue:kept") == b"a queued job"
    finally:
        supervisor.stop()
    assert not supervisor.redis.listening()  # stopped with the rest


async def test_the_daemon_restarts_a_killed_embedded_redis(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "REDIS_WATCH_S", 0.1)
    config = read_config(write_config(tmp_path))
    server = EmbeddedRedis(config.state_dir)
    stop = asyncio.Event()
    daemon = asyncio.create_task(service.run_daemon(config, stop))
    try:
        # Its intakes start after its queue is open and its watch on Redis runs.
        failed = config.intake.folder[0].path / "failed"
        await asyncio.to_thread(wait_for, failed.is_dir, 30, 0.05, "the daemon ready")
        await asyncio.to_thread(kill, server)
        await asyncio.to_thread(wait_for, server.is_running, 5, 0.05, "Redis back")
        assert not daemon.done()
    finally:
        stop.set()
        await daemon
    assert not server.listening()  # it started Redis, so it stopped it


async def test_a_daemon_whose_delivery_loop_dies_exits_to_be_restarted(tmp_path, redis_url,
                                                                       monkeypatch):
    async def fails(self, stop: asyncio.Event) -> None:
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(service.DeliveryLoop, "run", fails)
    config = read_config(write_config(tmp_path, redis_url))
    with pytest.raises(RedisConnectionError):  # exit status 1: systemd or `up` restarts it
        await asyncio.wait_for(service.run_daemon(config), 30)


async def test_a_file_dropped_while_redis_is_down_is_queued_soon_after_it_is_back(tmp_path):
    config = read_config(write_config(tmp_path))
    server = EmbeddedRedis(config.state_dir)
    server.start()
    queue = await QueueClient.open(server.url)
    folder = config.intake.folder[0]
    intake = FolderIntake(folder, config, submitter_for(config, queue))
    await intake.start()
    try:
        await asyncio.to_thread(kill, server)
        (folder.path / "fox.txt").write_text("a fox in the snow")
        await asyncio.sleep(1.0)  # taken, and refused by the missing Redis
        assert (folder.path / "fox.txt").exists()
        await asyncio.to_thread(server.start)
        # Offered again within seconds, not at the 30 s safety rescan.
        async def queued() -> bool:
            return await queue.queue_length() == 1
        for _ in range(100):
            if await queued():
                break
            await asyncio.sleep(0.1)
        assert await queued(), "the file was not queued within 10 s of Redis coming back"
    finally:
        await intake.stop()
        await queue.close()
        server.stop(only_if_idle=False)


async def test_a_delivery_done_while_redis_blinks_is_still_recorded(config, queue,
                                                                     monkeypatch):
    """Redis failing just as a delivery is recorded does not end the delivery loop, and
    the delivery leaves the active list once Redis answers again."""
    delivered, blinks = [], iter([RedisConnectionError("Connection closed by server.")])
    real_done = queue.delivery_done

    async def blinking_done(job_id: str) -> None:
        if (error := next(blinks, None)) is not None:
            raise error
        await real_done(job_id)

    async def deliver(self, job_id: str, state: dict) -> None:
        delivered.append(job_id)

    monkeypatch.setattr(queue, "delivery_done", blinking_done)
    monkeypatch.setattr(DeliveryLoop, "deliver", deliver)
    loop, stop = DeliveryLoop(config, queue), asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await queue.redis.lpush(DELIVERIES_KEY, "job-1")
    for _ in range(50):
        if not await queue.redis.llen(DELIVERIES_ACTIVE_KEY) and delivered:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await running
    assert delivered == ["job-1"]
    assert await queue.redis.llen(DELIVERIES_ACTIVE_KEY) == 0


# --- a full disk ------------------------------------------------------------------------


def test_a_full_disk_is_named_with_its_folder_free_space_and_what_to_do(tmp_path):
    scenes = tmp_path / "job" / "scenes"
    scenes.mkdir(parents=True)
    written = OSError(errno.ENOSPC, "No space left on device", str(scenes / "scene_01.mp4"))
    reason = disk_full_reason(written, tmp_path / "job")
    assert reason is not None and reason.startswith("the disk is full (No space left on device)")
    assert re.search(rf"\d+\.\d [GMK]B free on {re.escape(str(scenes))}\. Free some space "
                     "there, then submit the job again", reason), reason

    # ffmpeg says it only in its stderr; a pipeline may wrap the OSError in its own error.
    encode = FFmpegError("ffmpeg could not encode .scene_01.mp4.tmp:\n[out#0/mp4 @ 0x5] "
                         "Error writing trailer: No space left on device")
    assert f"free on {tmp_path / 'job'}." in disk_full_reason(encode, tmp_path / "job")
    try:
        try:
            raise written
        except OSError:
            raise JobError("could not save the storyboard") from None
    except JobError as wrapped:
        assert f"free on {scenes}." in disk_full_reason(wrapped, tmp_path / "job")
    assert disk_full_reason(JobError("the prompt is empty"), tmp_path / "job") is None
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
