"""Shared fixtures: a real embedded Redis for the session, small video settings, and
helpers to start the real daemon and worker as processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from daemon.compose import read_config
from daemon.config import Config
from daemon.queue import QueueClient
from daemon.redis_server import EmbeddedRedis
from daemon.submit import Submitter
from workers.pipelines import kind_registry

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-state"))
    server.start()
    yield server
    server.stop(only_if_idle=False)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    with redis_sync.Redis(unix_socket_path=str(redis_server.socket)) as client:
        client.flushall()
    return redis_server.url


def submitter_for(config: Config, queue: QueueClient) -> Submitter:
    """The one submission path as the daemon service builds it."""
    return Submitter(config, queue, kind_registry(config))


def write_config(tmp_path: Path, redis_url: str = "", **sections: str) -> Path:
    """A small, fast config file in ``tmp_path``; ``sections`` replace whole tables."""
    tables = {
        "state": 'dir = "var"',
        "redis": f'url = "{redis_url}"',
        "log": 'level = "info"\nformat = "json"',
        "intake.folder": 'path = "inbox"\nkind = "video"\nsettle = "0.5s"',
        "intake.http": "enabled = false",
        "worker": 'job_timeout = "2m"\nmax_tries = 3\nname = "test-worker"',
        "video": "width = 128\nheight = 96\nfps = 8\nscene_seconds = 3",
    }
    tables.update(sections)
    text = ""
    for name, body in tables.items():
        header = f"[[{name}]]" if name == "intake.folder" else f"[{name}]"
        text += f"{header}\n{body}\n\n"
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture
def config_file(tmp_path: Path, redis_url: str) -> Path:
    return write_config(tmp_path, redis_url)


@pytest.fixture
def config(config_file: Path) -> Config:
    return read_config(config_file)


@pytest.fixture
async def queue(config: Config) -> QueueClient:
    client = await QueueClient.open(config.redis.url, config.worker.keep_results)
    yield client
    await client.close()


class Process:
    """A reelqueue command run as a real child process, logging to a file."""

    def __init__(self, config_file: Path, *args: str):
        self.log_path = config_file.parent / f"{args[0]}-{time.monotonic_ns()}.log"
        self.handle = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(config_file), *args],
            cwd=REPO, stdout=self.handle, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.handle.close()

    def stop(self, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.handle.close()
        return self.popen.returncode


@pytest.fixture
def start() -> Iterator[Callable[..., Process]]:
    """``start(config_file, "worker", "--name", "w1")``: a reelqueue process that is
    stopped (SIGTERM, then SIGKILL) when the test ends, whatever happened."""
    started: list[Process] = []

    def launch(config_file: Path, *args: str) -> Process:
        process = Process(config_file, *args)
        started.append(process)
        return process

    yield launch
    for process in started:
        if process.popen.poll() is None:
            process.stop()
        else:
            process.handle.close()


@pytest.fixture
def spawn(config_file: Path, start: Callable[..., Process]) -> Callable[..., Process]:
    """``spawn("daemon")``: ``start`` with the test's own config file."""
    return lambda *args: start(config_file, *args)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.05,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def http_api_in_a_thread(config: Config, port: int) -> Iterator[None]:
    """The real HTTP API on ``127.0.0.1:port``, served from its own event loop in a thread,
    for clients that block (schemathesis, hypothesis with urllib)."""
    from aiohttp import web

    from intake.http import HttpApi

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def serve() -> None:
        state["queue"] = await QueueClient.open(config.redis.url)
        runner = web.AppRunner(HttpApi(config, submitter_for(config, state["queue"])).app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        state["runner"] = runner
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert ready.wait(30), "the HTTP API did not start"
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
        asyncio.run_coroutine_threadsafe(state["queue"].close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
