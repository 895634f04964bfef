"""The embedded Redis SIGKILLed on its own, daemon and worker untouched: it must come back
without a human, on its AOF, so that a job queued before the kill and one submitted
after it both run. Once under ``reelqueue up``, once with the daemon and the worker run
on their own, as systemd runs them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis as redis_sync

from tests.conftest import Process, wait_for
from tests.fault.stack import (
    TINY_FRAMES,
    drop,
    embedded_redis,
    fault_config,
    frame_count,
    kill_redis,
    prompt,
    redis_client,
    redis_pid,
    redis_servers_of,
    stop_redis_servers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WORKER = "test-worker"  # tests.conftest.write_config's [worker] name
BACK_S = 5.0  # Redis is looked at every second; a start takes a fraction of one


def cli(start, config_file: Path, *args: str) -> None:
    """A short reelqueue command (pause, resume), run to its end."""
    process = start(config_file, *args)
    assert process.popen.wait(timeout=60) == 0, process.log()


def job_status(client: redis_sync.Redis, inbox: Path, name: str) -> str | None:
    """The live status of the job made from ``inbox/name``, found by its source."""
    for key in client.scan_iter("reelqueue:job:*"):
        job_id = key.decode().rsplit(":", 1)[1]
        spec = inbox.parent / "var" / "jobs" / job_id / "spec.json"
        if spec.exists() and json.loads(spec.read_text())["source"].get("filename") == name:
            status = client.hget(key, "status")
            return status.decode() if status else None
    return None


def queue_one_held_job(start, config_file: Path, inbox: Path, state_dir: Path) -> None:
    """Pause the workers and queue ``before.txt``: a job waiting in Redis, not running."""
    wait_for(lambda: redis_pid(state_dir), timeout=30, what="the embedded Redis")
    cli(start, config_file, "pause", "--reason", "held by the test")
    with redis_client(state_dir) as client:
        # The worker reads the pause with its heartbeat: wait until it says it has.
        wait_for(lambda: json.loads(client.get(f"reelqueue:worker:{WORKER}") or "{}"
                                    ).get("paused"), timeout=60, what="the worker paused")
        drop(inbox, "before.txt", prompt("r001").encode())
        wait_for(lambda: job_status(client, inbox, "before.txt") == "queued", timeout=20,
                 what="before.txt queued")


def kill_and_wait_for_redis(state_dir: Path) -> float:
    """SIGKILL the embedded Redis; how long until another one serves the state dir."""
    killed = kill_redis(state_dir)
    assert killed is not None, "no embedded redis-server to kill"
    gone = time.monotonic()
    wait_for(lambda: redis_pid(state_dir) not in (None, killed), timeout=BACK_S,
             interval=0.05, what="the embedded Redis back")
    back = time.monotonic() - gone
    # Started is not loaded: until its AOF is read, Redis answers "loading".
    wait_for(lambda: embedded_redis(state_dir).is_running(), timeout=BACK_S, interval=0.05,
             what="the embedded Redis answering")
    return back


def both_jobs_run(start, config_file: Path, inbox: Path, state_dir: Path) -> None:
    with redis_client(state_dir) as client:
        assert job_status(client, inbox, "before.txt") == "queued"  # the AOF kept it
    cli(start, config_file, "resume")
    drop(inbox, "after.txt", prompt("r002").encode())
    done = inbox / "done"
    wait_for(lambda: (done / "before.mp4").exists() and (done / "after.mp4").exists(),
             timeout=90, interval=0.2, what="both videos in done/")
    assert frame_count(done / "before.mp4") == frame_count(done / "after.mp4") == TINY_FRAMES
    assert not list((inbox / "failed").iterdir())
    assert len(redis_servers_of(state_dir)) == 1


def test_up_restarts_a_killed_embedded_redis_and_loses_no_job(tmp_path, start):
    config_file = fault_config(tmp_path)  # the embedded Redis
    state_dir, inbox = tmp_path / "var", tmp_path / "inbox"
    up = start(config_file, "up")
    try:
        queue_one_held_job(start, config_file, inbox, state_dir)
        back_s = kill_and_wait_for_redis(state_dir)
        both_jobs_run(start, config_file, inbox, state_dir)
        restarts = [json.loads(line) for line in up.log().splitlines()
                    if line.startswith("{") and '"child exited; restarting"' in line]
        print(f"\nredis back after {back_s:.2f} s; children restarted: "
              f"{[r['child'] for r in restarts]}")
        # Brought back as such, not by a restarted worker's start-up (as before the fix)…
        assert "embedded redis is gone; starting it again" in up.log()
        # …and the daemon rides the outage out; the worker (arq) exits and is restarted.
        assert "daemon" not in [r["child"] for r in restarts]
    finally:
        up.stop()
        stop_redis_servers(state_dir)


def test_a_daemon_on_its_own_restarts_a_killed_embedded_redis(tmp_path, start):
    """As under systemd: no ``up``. The daemon brings Redis back itself; the worker exits
    non-zero, and its restart (Restart=on-failure) finds Redis there again."""
    config_file = fault_config(tmp_path)
    state_dir, inbox = tmp_path / "var", tmp_path / "inbox"
    daemon: Process = start(config_file, "daemon")
    try:
        wait_for(lambda: "daemon ready" in daemon.log(), timeout=60, what="the daemon")
        worker = start(config_file, "worker")
        queue_one_held_job(start, config_file, inbox, state_dir)
        back_s = kill_and_wait_for_redis(state_dir)
        code = worker.popen.wait(timeout=30)
        print(f"\nredis back after {back_s:.2f} s; the worker exited with {code}")
        assert code != 0  # so that systemd restarts it
        assert daemon.popen.poll() is None
        start(config_file, "worker")  # systemd's restart
        both_jobs_run(start, config_file, inbox, state_dir)
    finally:
        daemon.stop()
        stop_redis_servers(state_dir)
