"""``reelqueue up``: the embedded Redis, the daemon and one worker in the foreground,
like ``docker compose up``. Children that die are restarted with backoff, and so is the
embedded Redis (on its AOF: queued jobs survive); Ctrl-C (or SIGTERM) stops the daemon
and the worker gracefully, then Redis.

The children end with the supervisor even when it is SIGKILLed (``daemon.lifeline``).
Their ids are kept in ``<state>/up.json``; a start that finds processes of an earlier
run still alive there names them and how to stop them, and starts nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis.exceptions import RedisError

from daemon import files
from daemon.config import Config
from daemon.jobs import JobError
from daemon.lifeline import SUPERVISED_ENV, command_line, die_with_parent, still_running
from daemon.logs import get_logger
from daemon.redis_server import EmbeddedRedis, EmbeddedRedisError

log = get_logger(component="supervisor")
STOP_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 60.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches the supervisor alone, which
        # then stops the children in order. Tied to the supervisor: SIGTERM when it dies.
        self.process = subprocess.Popen(
            self.argv, start_new_session=True, preexec_fn=die_with_parent(),
            env={**os.environ, SUPERVISED_ENV: str(os.getpid())})
        self.started_at = time.monotonic()
        log.info("started", child=self.name, pid=self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None):
        self.config = config
        base = [sys.executable, "-m", "daemon.cli"]
        if config_path is not None:
            base += ["--config", str(config_path)]
        self.children = [Child("daemon", base + ["daemon"]), Child("worker", base + ["worker"])]
        self.redis: EmbeddedRedis | None = None
        self.owns_redis = False
        self.redis_failures = 0
        self.redis_next_try = 0.0
        self.stopping = False
        self.pid_file = config.state_dir / "up.json"

    def start(self) -> None:
        self.refuse_leftovers()
        if not self.config.redis.url:
            self.redis = EmbeddedRedis(self.config.state_dir, self.config.redis.appendfsync,
                                       die_with_parent=True)
            self.owns_redis = self.redis.start()
        for child in self.children:
            child.start()
        self.record_pids()

    def exited(self, name: str) -> int | None:
        """The exit status of child ``name`` when it is not running, else None."""
        child = next(child for child in self.children if child.name == name)
        return None if child.process is None else child.process.poll()

    def record_pids(self) -> None:
        """``up.json``: this supervisor and what it started, as their command lines."""
        recorded = {"up": os.getpid()} | {
            child.name: child.process.pid for child in self.children if child.process}
        if self.redis is not None and self.owns_redis and (pid := self.redis.pid()):
            recorded["redis"] = pid
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(self.pid_file, {name: {"pid": pid, "argv": command_line(pid)}
                                         for name, pid in recorded.items()})

    def refuse_leftovers(self) -> None:
        """Raise, naming them and how to stop them, if processes an earlier ``up`` (or
        ``demo``) started still run: a second daemon would find the port taken, a second
        worker would share the GPU."""
        try:
            earlier = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return
        alive = {name: entry["pid"] for name, entry in earlier.items()
                 if entry.get("argv") and still_running(entry["pid"], entry["argv"])}
        if not alive:
            return
        names = ", ".join(f"{name} (pid {pid})" for name, pid in alive.items())
        if "up" in alive:
            raise JobError(f"reelqueue up already runs for {self.config.state_dir}: {names}; "
                           f"stop it with Ctrl-C there, or `kill {alive['up']}`")
        raise JobError(f"processes of an earlier reelqueue up still run: {names}. Stop them "
                       f"with `kill {' '.join(str(pid) for pid in alive.values())}` (a clean "
                       "stop), then start again")

    def check(self) -> None:
        """Restart the embedded Redis if it died, and children that exited, with
        exponential backoff (1 s … 60 s)."""
        now = time.monotonic()
        if self.redis is not None and not self.stopping and now >= self.redis_next_try:
            self.keep_redis(now)
        for child in self.children:
            if child.alive() or self.stopping:
                continue
            if child.next_start == 0.0:
                code = child.process.returncode if child.process else None
                # A child that ran a good while before dying gets a fresh backoff.
                if now - child.started_at > 60:
                    child.restarts = 0
                delay = min(MAX_BACKOFF_S, 2.0**child.restarts)
                child.next_start = now + delay
                log.warning("child exited; restarting", child=child.name, code=code,
                            in_s=delay)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start()
                self.record_pids()

    def keep_redis(self, now: float) -> None:
        """Start the embedded Redis again if it died. The daemon does the same, and the
        start lock lets only one of them start it; doing it here too covers a daemon
        that is down or restarting at that moment."""
        assert self.redis is not None
        try:
            if self.redis.revive():
                self.record_pids()
            self.redis_failures = 0
        # A damaged AOF (its log tail says so), or a server dying again as it starts.
        except (EmbeddedRedisError, RedisError, OSError) as exc:
            self.redis_failures += 1
            delay = min(MAX_BACKOFF_S, 2.0**self.redis_failures)
            self.redis_next_try = now + delay
            log.error("could not start the embedded redis again", error=str(exc), in_s=delay)

    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("child did not stop in time; killing it", child=child.name)
                child.process.kill()
                child.process.wait()
        if self.redis is not None and self.owns_redis:
            self.redis.stop(only_if_idle=False)
        self.pid_file.unlink(missing_ok=True)

    def serve_forever(self) -> int:
        stop_requested = False

        def request_stop(signum: int, frame: object) -> None:
            nonlocal stop_requested
            stop_requested = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.start()
        try:
            while not stop_requested:
                self.check()
                time.sleep(0.2)
        finally:
            self.stop()
        return 0
