"""The HTTP API's crash windows, made deterministic. A POST writes the job's spec,
records its Idempotency-Key and queues the job; the chaos test kills the daemon and
Redis at random moments and only now and then lands between those steps. Here a fault
is injected exactly there, leaving the state such a kill leaves, and the careful
client's retry (same key) must still end with exactly one job that runs.

Both found by this suite (a 202 for a job never queued; a 404 for every retry), and
fixed; they stay as regression tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_sync

from tests.conftest import free_port, wait_for
from tests.fault.stack import fault_config, fill, http_call, http_section, prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RUN_S = 30  # a tiny job runs in a second or two once a worker has it


def start_daemon(tmp_path: Path, redis_url: str, start, **sections: str) -> int:
    port = free_port()
    config_file = fault_config(tmp_path, redis_url, **{"intake.http": http_section(port),
                                                       **sections})
    daemon = start(config_file, "daemon")
    wait_for(lambda: "daemon ready" in daemon.log(), timeout=30, what="the daemon")
    start(config_file, "worker")
    return port


def post(port: int, tag: str) -> tuple[int, object]:
    return http_call(port, "POST", "/jobs", {"kind": "video", "prompt": prompt(tag)},
                     {"Idempotency-Key": f"crash-window-{tag}"})


def finished(port: int, job_id: str) -> bool:
    status, body = http_call(port, "GET", f"/jobs/{job_id}")
    return status == 200 and body["status"] in ("done", "failed")


def test_a_retry_after_redis_failed_mid_submit_gets_a_job_that_runs(tmp_path, redis_url,
                                                                    start):
    port = start_daemon(tmp_path, redis_url, start)
    admin = redis_sync.Redis.from_url(redis_url)
    # HSET refused from here on: the spec is written and the key recorded (SET), then
    # the enqueue fails at its first HSET, as if Redis had been killed right there.
    admin.execute_command("ACL", "SETUSER", "default", "-hset")
    try:
        status, body = post(port, "i001")
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+hset")
    assert status == 503, body  # "try again shortly": the client does

    status, body = post(port, "i001")
    assert status == 202, body
    job_id = body["id"]
    wait_for(lambda: finished(port, job_id), timeout=RUN_S,
             what=f"job {job_id} to run (it says {http_call(port, 'GET', f'/jobs/{job_id}')})")


def test_a_retry_after_the_spec_could_not_be_written_is_accepted(tmp_path, redis_url,
                                                                 small_disk, start):
    port = start_daemon(tmp_path, redis_url, start, state=f'dir = "{small_disk}"',
                        queue="min_free_gb = 0")
    fill(small_disk, 0)
    status, body = post(port, "i002")
    assert status == 503, body  # the spec could not be written: "try again shortly"
    # (Before the fix the key was recorded first, and every retry was 404 for 24 h.)
    (small_disk / "filler").unlink()  # the administrator frees space

    status, body = post(port, "i002")
    assert status == 202, body
    job_id = body["id"]
    wait_for(lambda: finished(port, job_id), timeout=RUN_S, what=f"job {job_id} to run")
