"""A watch-folder storm: a thousand files at once, files renamed into place, files
abandoned and deleted before they could be taken, a 2 GB file, and a second folder on
the polling observer, all at the same time. No worker runs, so every job stays queued
where it can be counted."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
import redis as redis_sync

from daemon.jobs import JobSpec
from tests.conftest import wait_for
from tests.fault.stack import drop, fault_config, peak_rss_mb, prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

STORM = 1000
RENAMED = 20
POLLED = 20
ABANDONED = 10
HUGE_BYTES = 2 * 1024**3
SETTLE_S = 2.0  # the inbox's settle; a file never seen closed waits 5 × this
# The daemon holds no file in memory: a 2 GB read would show as a peak over 2 GB.
MAX_DAEMON_RSS_MB = 500


def folders(tmp_path: Path) -> str:
    return (f'path = "inbox"\nkind = "video"\nsettle = "{SETTLE_S}s"\n'
            '[[intake.folder]]\npath = "share"\nkind = "video"\npoll = true\n'
            'poll_interval = "0.5s"\nsettle = "0.5s"')


def queued(client: redis_sync.Redis) -> int:
    return client.zcard("arq:queue")


def job_specs(jobs_dir: Path) -> list[JobSpec]:
    return [JobSpec.model_validate_json(p.read_text()) for p in jobs_dir.glob("*/spec.json")]


def kind_of_drop(spec: JobSpec) -> str:
    """"inbox/storm" for inbox/storm0042.txt: which part of the storm a job came from."""
    prefix = re.match(r"[a-z]+", spec.source.filename or "")
    return f"{Path(spec.source.folder or '').name}/{prefix.group(0) if prefix else ''}"


def abandon(inbox: Path, count: int) -> list:
    """Files a writer opened, wrote to and never closed: not complete, so not taken
    before the grace for unclosed files runs out."""
    handles = []
    for n in range(count):
        handle = (inbox / f"abandoned{n:02d}.txt").open("wb")
        handle.write(prompt(f"a{n:03d}").encode())
        handle.flush()
        handles.append(handle)
    return handles


def test_a_storm_of_files_is_queued_exactly_once_and_a_huge_file_is_refused_unread(
        tmp_path, redis_url, start):
    config_file = fault_config(tmp_path, redis_url, **{"intake.folder": folders(tmp_path)})
    inbox, share = tmp_path / "inbox", tmp_path / "share"
    daemon = start(config_file, "daemon")  # and no worker
    wait_for(lambda: "daemon ready" in daemon.log(), timeout=30, what="the daemon")
    client = redis_sync.Redis.from_url(redis_url)
    began = time.monotonic()

    abandoned = abandon(inbox, ABANDONED)
    for n in range(STORM):  # written in place, closed: each taken at its close event
        (inbox / f"storm{n:04d}.txt").write_bytes(prompt(f"s{n:04d}").encode())
    for n in range(RENAMED):
        drop(inbox, f"renamed{n:02d}.txt", prompt(f"r{n:03d}").encode())
    huge = inbox / ".huge.txt.part"
    with huge.open("wb") as handle:
        handle.truncate(HUGE_BYTES)  # sparse: no disk used, 2 GB to anyone who reads it
    huge.rename(inbox / "huge.txt")
    for n in range(POLLED):
        (share / f"polled{n:02d}.txt").write_bytes(prompt(f"p{n:03d}").encode())
    time.sleep(0.5)
    for handle in abandoned:  # gone long before their settle time is up
        Path(handle.name).unlink()
        handle.close()

    expected = STORM + RENAMED + POLLED
    wait_for(lambda: queued(client) >= expected, timeout=60, interval=0.25,
             what=f"{expected} queued jobs (have {queued(client)})")
    took = time.monotonic() - began
    # Past the moment the abandoned files would have been taken, had they stayed.
    time.sleep(max(0.0, SETTLE_S * 5 + 1 - (time.monotonic() - began)))
    peak_mb = peak_rss_mb(daemon.popen.pid)
    print(f"\n{expected} jobs queued in {took:.1f} s; daemon peak RSS {peak_mb:.0f} MB")

    assert queued(client) == expected
    specs = job_specs(tmp_path / "var" / "jobs")
    assert Counter(map(kind_of_drop, specs)) == {
        "inbox/storm": STORM, "inbox/renamed": RENAMED, "share/polled": POLLED}
    assert len({(s.source.folder, s.source.filename) for s in specs}) == expected

    # The 2 GB file: refused by its size, moved aside with the reason, never read.
    error = inbox / "failed" / "huge.error.txt"
    assert error.exists()
    assert "2048.0 MB" in error.read_text() and "max_file_mb" in error.read_text()
    assert (inbox / "failed" / "huge.txt").stat().st_size == HUGE_BYTES
    assert not (inbox / "huge.txt").exists()
    assert peak_mb < MAX_DAEMON_RSS_MB

    # Deleted before pickup: never queued, never reported.
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["huge.error.txt",
                                                                    "huge.txt"]
    assert not list((share / "failed").iterdir())
    # Every request stays in its inbox until its result is delivered.
    assert len(list(inbox.glob("*.txt"))) == STORM + RENAMED
    assert len(list(share.glob("*.txt"))) == POLLED

