"""A full disk: the state folder on a 20 MB tmpfs. A job whose encode runs out of space
must fail where its sender sees it and leave no half video behind; with the disk floor
on, a job must be held rather than started at all.

Mounting needs root (or CAP_SYS_ADMIN); elsewhere these tests skip and say so. Redis
lives elsewhere (the session's server): its AOF on a full disk is another story."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import redis as redis_sync

from tests.conftest import wait_for
from tests.fault.stack import drop, fault_config, fill, hidden_files, job_starts, prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Left free once the disk is filled: room for the job's small files (log, storyboard),
# not for its scene clip (about 170 KB at this size).
LEFT_FREE = 64 * 1024
BIG_ENOUGH_VIDEO = "width = 640\nheight = 360\nfps = 24\nscene_seconds = 3"
ANSWER_S = 20  # a failure is delivered within seconds; a stuck job never is


def state_section(disk: Path) -> str:
    return f'dir = "{disk}"'


def job_state(client: redis_sync.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(f"reelqueue:job:{job_id}").items()}


def run_on_a_full_disk(tmp_path: Path, redis_url: str, start, disk: Path, leave: int,
                       answered) -> tuple[Path, dict[str, str]]:
    """Queue one job, fill the state disk but ``leave`` bytes, start a worker, and wait
    up to ANSWER_S for ``answered(inbox, state)``. Returns the inbox and the job's state."""
    config_file = fault_config(tmp_path, redis_url, state=state_section(disk),
                               video=BIG_ENOUGH_VIDEO, queue="min_free_gb = 0")
    inbox = tmp_path / "inbox"  # on the big disk: the answer has room to land
    daemon = start(config_file, "daemon")
    wait_for(lambda: "daemon ready" in daemon.log(), timeout=30, what="the daemon")
    drop(inbox, "crowded.txt", prompt("d001").encode())
    client = redis_sync.Redis.from_url(redis_url)
    wait_for(lambda: client.zcard("arq:queue") == 1, timeout=20, what="the job queued")
    [job] = list((disk / "jobs").iterdir())

    free = fill(disk, leave)
    start(config_file, "worker")
    began = time.monotonic()
    try:
        wait_for(lambda: answered(inbox, job_state(client, job.name)), timeout=ANSWER_S,
                 what="an answer the sender can see")
    finally:
        state = job_state(client, job.name)
        print(f"\n{free / 1024:.0f} KB free when the job started; after "
              f"{time.monotonic() - began:.1f} s its state is {state.get('status')!r} "
              f"({state.get('error') or state.get('message')!r}); job dir "
              f"{sorted(os.listdir(job))}, temp files {[p.name for p in hidden_files(job)]}")
    return inbox, state


def failed_in_the_folder(inbox: Path, state: dict[str, str]) -> bool:
    return (inbox / "failed" / "crowded.error.txt").exists() or \
        (inbox / "done" / "crowded.mp4").exists()


def test_disk_full_during_encode_fails_the_job_visibly(tmp_path, redis_url, small_disk, start):
    inbox, _ = run_on_a_full_disk(tmp_path, redis_url, start, small_disk, LEFT_FREE,
                                  failed_in_the_folder)
    error = inbox / "failed" / "crowded.error.txt"
    assert error.exists() and not (inbox / "done" / "crowded.mp4").exists()
    reason = error.read_text()
    print(reason)
    # Plain words: what happened, where, how much is free, what to do; no "internal error".
    assert "the disk is full (No space left on device)" in reason
    assert re.search(rf"\d+\.\d KB free on {re.escape(str(small_disk))}\S*\. Free some space "
                     "there, then submit the job again", reason), reason
    assert "internal error" not in reason
    assert not list((inbox / "done").iterdir())  # no half video, nothing at all
    assert not hidden_files(inbox / "failed")
    assert (inbox / "failed" / "crowded.txt").exists()  # the request, kept


def test_a_state_disk_with_no_byte_free_fails_or_holds_the_job_visibly(
        tmp_path, redis_url, small_disk, start):
    def failed_or_held(inbox: Path, state: dict[str, str]) -> bool:
        held = state.get("status") == "queued" and "space" in state.get("message", "")
        return failed_in_the_folder(inbox, state) or held

    inbox, _ = run_on_a_full_disk(tmp_path, redis_url, start, small_disk, 0, failed_or_held)
    assert not list((inbox / "done").iterdir())


def test_the_disk_floor_holds_a_job_instead_of_starting_it(tmp_path, redis_url, small_disk,
                                                           start):
    # The default floor (2 GB) is far above this 20 MB disk.
    config_file = fault_config(tmp_path, redis_url, state=state_section(small_disk),
                               queue="min_free_gb = 2.0")
    inbox = tmp_path / "inbox"
    start(config_file, "daemon")
    start(config_file, "worker")
    drop(inbox, "held.txt", prompt("d002").encode())
    client = redis_sync.Redis.from_url(redis_url)

    def held_state() -> dict[str, str] | None:
        for key in client.scan_iter("reelqueue:job:*"):
            state = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
            if state.get("stage") == "held":
                return state
        return None

    state = wait_for(held_state, timeout=45, what="the job held")
    assert state["status"] == "queued"
    assert "min_free_gb" in state["message"] and str(small_disk) in state["message"]
    [job] = list((small_disk / "jobs").iterdir())
    assert job_starts(job) == 0
    assert (inbox / "held.txt").exists()  # waiting, not refused
    assert not list((inbox / "done").iterdir()) and not list((inbox / "failed").iterdir())

