"""Issue 13, items 11 and 12, with the real processes: a channel that cannot start (a
busy HTTP port, a drop folder that cannot be made) does not take the others down, and
the children of a SIGKILLed `reelqueue up` end with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon.compose import read_config
from daemon.doctor import check_http_port
from daemon.findings import Level
from tests.conftest import REPO, free_port, wait_for
from tests.fault.stack import drop, fault_config, http_section, prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def cli(config_file: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(config_file),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_busy_http_port_stops_only_http_which_starts_once_the_port_frees(
        tmp_path, redis_url, start):
    port = free_port()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    config_file = fault_config(tmp_path, redis_url, **{"intake.http": http_section(port)})
    config = read_config(config_file)
    try:
        daemon = start(config_file, "daemon")
        start(config_file, "worker")
        inbox = tmp_path / "inbox"
        drop(inbox, "fox.txt", prompt("busy-port").encode())
        wait_for(lambda: (inbox / "done" / "fox.mp4").exists(), timeout=90,
                 what="the dropped file, delivered while the port is busy")
        assert daemon.popen.poll() is None, daemon.log()  # never exited
        assert "channel could not start" in daemon.log()
        status = cli(config_file, "status").stdout
        assert "channel folder: running" in status, status
        assert "channel http: NOT RUNNING" in status and "cannot listen on" in status, status
        [finding] = check_http_port(config)
        assert finding.level is Level.ERROR and "held by another program" in finding.what
    finally:
        squatter.close()
    # The port is free: the daemon's next try takes it, and nothing restarted.
    wait_for(lambda: "channel http: running" in cli(config_file, "status").stdout,
             timeout=60, interval=1, what="the HTTP API after the port freed")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503 with no worker alive: still an answer
        body = json.loads(exc.read())
    assert body["redis"] == "ok"
    # It tells what runs, and what it took to get there.
    assert body["channels"]["http"]["state"] == "running"
    assert body["channels"]["folder"]["state"] == "running"
    [finding] = check_http_port(config)
    assert finding.level is Level.OK and "reelqueue's own daemon" in finding.what
    assert f"pid {daemon.popen.pid}" in finding.what
    assert daemon.log().count("daemon ready") == 1


def test_demo_fails_fast_naming_the_cause_and_leaves_no_request_behind(tmp_path):
    config_file = fault_config(tmp_path)  # the embedded Redis, as `make demo` has it
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "done").write_text("a file where the results folder should be\n")
    started = time.monotonic()
    result = cli(config_file, "demo", timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot watch {inbox}" in result.stderr and "done" in result.stderr, result.stderr
    assert "is a regular file, not a folder" in result.stderr
    assert elapsed < 50, f"took {elapsed:.0f} s to give up"
    assert not (inbox / "fox.txt").exists()
    assert not list(inbox.glob(".fox.txt*"))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended


def test_sigkill_of_up_ends_its_children_and_the_next_up_starts(tmp_path, start):
    config_file = fault_config(tmp_path)  # embedded Redis, started by `up`
    up = start(config_file, "up")
    redis_pid_file = tmp_path / "var" / "redis" / "redis.pid"
    wait_for(lambda: "daemon ready" in up.log() and redis_pid_file.exists(), timeout=60,
             what="up's daemon and Redis")
    wait_for(lambda: len(_children(up.popen.pid)) >= 3, what="daemon, worker and Redis")
    children = _children(up.popen.pid)
    redis_pid = int(redis_pid_file.read_text())
    assert len(children) >= 2 and redis_pid in children, (children, redis_pid)
    up.kill()
    try:
        wait_for(lambda: not any(map(_running, children)), timeout=10,
                 what="the children of the killed up to end")
    finally:
        for pid in filter(_running, children):  # old code: clean up what it left
            os.kill(pid, signal.SIGKILL)
    again = start(config_file, "up")
    wait_for(lambda: "daemon ready" in again.log(), timeout=60, what="the next up")
    inbox = tmp_path / "inbox"
    drop(inbox, "after.txt", prompt("after-kill").encode())
    wait_for(lambda: (inbox / "done" / "after.mp4").exists(), timeout=90, what="a delivery")
    assert again.stop() == 0
    assert "processes of an earlier" not in again.log()
