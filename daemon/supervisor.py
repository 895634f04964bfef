"""``reelqueue up``: the embedded Redis, the daemon and one worker in the foreground,
like ``docker compose up``. Children that die are restarted with backoff, and so is the
embedded Redis (on its AOF: queued jobs survive); Ctrl-C (or SIGTERM) stops the daemon
and the worker gracefully, then Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis.exceptions import RedisError

from daemon.config import Config
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
        # then stops the children in order.
        self.process = subprocess.Popen(self.argv, start_new_session=True)
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

    def start(self) -> None:
        if not self.config.redis.url:
            self.redis = EmbeddedRedis(self.config.state_dir, self.config.redis.appendfsync)
            self.owns_redis = self.redis.start()
        for child in self.children:
            child.start()

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

    def keep_redis(self, now: float) -> None:
        """Start the embedded Redis again if it died. The daemon does the same, and the
        start lock lets only one of them start it; doing it here too covers a daemon
        that is down or restarting at that moment."""
        assert self.redis is not None
        try:
            self.redis.revive()
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
