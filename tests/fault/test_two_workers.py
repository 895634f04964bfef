"""Two workers (two GPUs, or two machines) on one Redis: the queue spreads jobs over
both, and no job runs on both."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import redis as redis_sync

from tests.conftest import wait_for
from tests.fault.stack import TINY_FRAMES, drop, fault_config, frame_count, job_starts, prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

JOBS = 10
WORKERS = ("fault-gpu0", "fault-gpu1")


def test_two_workers_share_the_queue_and_run_no_job_twice(tmp_path, redis_url, start):
    config_file = fault_config(tmp_path, redis_url)
    start(config_file, "daemon")
    for name in WORKERS:
        start(config_file, "worker", "--name", name)
    client = redis_sync.Redis.from_url(redis_url)
    # Both must be taking jobs before the first arrives, or one could take them all.
    wait_for(lambda: all(client.exists(f"reelqueue:worker:{n}") for n in WORKERS),
             timeout=60, what="both workers' heartbeats")
    inbox = tmp_path / "inbox"
    for n in range(JOBS):
        drop(inbox, f"job{n:02d}.txt", prompt(f"w{n:03d}").encode())
    done = inbox / "done"
    wait_for(lambda: len(list(done.glob("*.mp4"))) == JOBS, timeout=60, interval=0.2,
             what=f"{JOBS} videos in done/")
    time.sleep(1.5)  # a job run twice would deliver a second time by now

    jobs = [d for d in (tmp_path / "var" / "jobs").iterdir() if (d / "spec.json").exists()]
    ran_on = Counter(client.hget(f"reelqueue:job:{d.name}", "worker").decode() for d in jobs)
    starts = {d.name: job_starts(d) for d in jobs}
    print(f"\njobs per worker: {dict(ran_on)}")
    assert len(jobs) == JOBS
    assert starts == {d.name: 1 for d in jobs}, "a job was started more than once"
    assert set(ran_on) == set(WORKERS), f"one worker did everything: {dict(ran_on)}"
    assert sorted(p.name for p in done.glob("*.mp4")) == [f"job{n:02d}.mp4" for n in range(JOBS)]
    assert all(frame_count(p) == TINY_FRAMES for p in done.glob("*.mp4"))
    assert not list((inbox / "failed").iterdir())
    reports = [json.loads(p.read_text()) for p in done.glob("*.report.json")]
    assert all(r["status"] == "done" for r in reports)
