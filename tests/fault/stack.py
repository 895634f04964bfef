"""Helpers for the fault-injection suite: configs for tiny jobs, the real processes kept
running the way a supervisor would, the embedded Redis they share, and looks at what
landed in the output folders."""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import redis as redis_sync

from daemon.redis_server import EmbeddedRedis
from tests.conftest import Process, write_config

# The smallest job that renders reliably: one scene of 3 s at 4 fps, 12 frames, ~1 s of
# work. Not 64 px wide: the animatic's slate overlay crashes at width 64 (see README).
TINY_VIDEO = "width = 96\nheight = 64\nfps = 4\nscene_seconds = 3"
TINY_FRAMES = 4 * 3
# Post-production off where it costs time and proves nothing here.
FAST_POST = 'subtitles = "off"\ntransition = "cut"'
HTTP_TOKEN = "fault-suite-token"


def prompt(tag: str) -> str:
    """A one-scene prompt carrying a tag, so every job can be traced to its request.
    No sentence punctuation: the planner would split the prompt into more scenes."""
    return f"request {tag} a red fox runs through the snow"


def fault_config(tmp_path: Path, redis_url: str = "", **sections: str) -> Path:
    """``tests.conftest.write_config`` with tiny jobs; an empty ``redis_url`` means the
    embedded Redis under ``tmp_path/var/redis``."""
    return write_config(tmp_path, redis_url, **{"video": TINY_VIDEO, "post": FAST_POST,
                                                 **sections})


def http_section(port: int) -> str:
    return (f'enabled = true\nlisten = "127.0.0.1:{port}"\n'
            f'[[intake.http.tokens]]\nname = "fault"\ntoken = "{HTTP_TOKEN}"\nrole = "admin"')


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Write under a hidden temp name and rename into place, as the README advises."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(inbox / name)
    return inbox / name


# --- processes ------------------------------------------------------------------------


class Supervised:
    """A reelqueue command kept running like systemd's ``Restart=always`` would: started
    again ``restart_delay`` seconds after it dies, whether killed or by itself."""

    def __init__(self, config_file: Path, *args: str, restart_delay: float = 0.5):
        self.config_file = config_file
        self.args = args
        self.restart_delay = restart_delay
        self.process: Process | None = None
        self.kills = 0
        self.starts = 0
        self.exits: list[int] = []  # exit codes of deaths we did not cause
        self._restart_at: float | None = None
        self._killed_by_us = False

    @property
    def name(self) -> str:
        return " ".join(self.args)

    def start(self) -> None:
        self.process = Process(self.config_file, *self.args)
        self.starts += 1
        self._restart_at, self._killed_by_us = None, False

    def alive(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.popen.pid if self.alive() and self.process else None

    def kill(self) -> bool:
        """SIGKILL it if it runs; True if it did."""
        if not self.alive() or self.process is None:
            return False
        self._killed_by_us = True
        self.process.kill()
        self.kills += 1
        return True

    def tend(self, now: float) -> str | None:
        """Notice a death and restart after the delay (call this often). Says what it
        did: "exited by itself (code N)", "restarted (pid N)", or None."""
        if self.process is None or self.alive():
            return None
        if self._restart_at is None:
            self._restart_at = now + self.restart_delay
            code = self.process.stop()  # already gone: this only closes its log
            if not self._killed_by_us:
                self.exits.append(code)
                return f"exited by itself (code {code})"
        elif now >= self._restart_at:
            self.start()
            return f"restarted (pid {self.pid})"
        return None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return self.process.stop()

    def logs(self) -> list[Path]:
        prefix = self.args[0]
        return sorted(self.config_file.parent.glob(f"{prefix}-*.log"))


# --- the embedded Redis -----------------------------------------------------------------


def embedded_redis(state_dir: Path) -> EmbeddedRedis:
    return EmbeddedRedis(state_dir)


def redis_client(state_dir: Path) -> redis_sync.Redis:
    return redis_sync.Redis(unix_socket_path=str(embedded_redis(state_dir).socket),
                            socket_timeout=2, socket_connect_timeout=2)


def is_live(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def redis_servers_of(state_dir: Path) -> list[int]:
    """Live redis-server processes serving this state dir. Redis rewrites its command
    line, but it chdirs into its data dir, so its cwd says which one it is."""
    data_dir = (state_dir / "redis").resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if Path(exe).name == "redis-server" and Path(cwd) == data_dir and \
                is_live(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def redis_pid(state_dir: Path) -> int | None:
    """The pid in ``<state>/redis/redis.pid`` if that process is a live redis-server of
    this state dir (a SIGKILLed server leaves its pid file behind)."""
    try:
        pid = int((state_dir / "redis" / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid in redis_servers_of(state_dir) else None


def kill_redis(state_dir: Path) -> int | None:
    """SIGKILL the embedded redis-server; its pid, or None if none was running."""
    pid = redis_pid(state_dir)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid


def stop_redis_servers(state_dir: Path) -> None:
    """Teardown: a clean shutdown of the embedded Redis, then SIGKILL for any left over
    (they run in their own session, so they outlive the processes that started them)."""
    embedded_redis(state_dir).stop(only_if_idle=False)
    deadline = time.monotonic() + 5
    while redis_servers_of(state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in redis_servers_of(state_dir):
        os.kill(pid, signal.SIGKILL)


# --- disks ---------------------------------------------------------------------------


def fill(disk: Path, leave: int) -> int:
    """Fill ``disk`` up, then give ``leave`` bytes back; returns the bytes free."""
    filler = disk / "filler"
    chunk = b"\0" * (1024 * 1024)
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return shutil.disk_usage(disk).free


# --- HTTP ------------------------------------------------------------------------------


def http_call(port: int, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None, timeout: float = 10
              ) -> tuple[int, Any]:
    """One request; (status, JSON body or text). Connection errors raise OSError or
    http.client.HTTPException, as they would for any client."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        all_headers = {"Authorization": f"Bearer {HTTP_TOKEN}", **(headers or {})}
        if payload is not None:
            all_headers["Content-Type"] = "application/json"
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


# --- what landed ------------------------------------------------------------------------


def hidden_files(folder: Path) -> list[Path]:
    """Temp names (``.name.pid.tmp``) left behind: a write that never finished."""
    return sorted(p for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() \
        else []


def frame_count(video: Path) -> int | None:
    """Frames ffmpeg decodes from the file; None when it does not decode at all."""
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    except (RuntimeError, OSError):
        return None
    return frames


def job_starts(job_directory: Path) -> int:
    """How many times a worker started the job, from its own log.jsonl."""
    log = job_directory / "log.jsonl"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines()
               if line.strip() and json.loads(line).get("event") == "job started")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
