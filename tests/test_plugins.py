"""A new job kind and a new channel, each written as one module outside reelqueue and
registered by one line of ``[plugins]``: a job goes through both end to end with the
real daemon, worker and Redis."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from daemon.compose import read_config
from daemon.doctor import check_config
from tests.conftest import free_port, wait_for, write_config

pytestmark = pytest.mark.timeout(120)

PLUGINS = ('kinds = { echo = "tests.plugins.echo_kind" }\n'
           'channels = ["tests.plugins.line_channel"]')


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(line.encode() + b"\n")
        return connection.makefile().readline().strip()


def test_a_plugin_kind_through_a_plugin_channel(tmp_path, redis_url, start, monkeypatch):
    port = free_port()
    monkeypatch.setenv("REELQUEUE_LINE_PORT", str(port))
    config_file = write_config(tmp_path, redis_url, plugins=PLUGINS)
    config = read_config(config_file)
    assert [f for f in check_config(config) if f.level == "error"] == []
    daemon = start(config_file, "daemon")
    start(config_file, "worker")
    wait_for(lambda: "daemon ready" in daemon.log(), what="the daemon")

    # Checked at submission like any kind: a bad option, an empty prompt.
    assert ask(port, "echo") == "refused an echo needs a prompt to echo"
    assert ask(port, "hologram a fox").startswith("refused unknown job kind 'hologram'")
    answer = ask(port, "echo a red fox")
    assert answer.startswith("queued ")
    job_id = answer.split()[1]

    results = config.state_dir / "line-results.jsonl"
    wait_for(results.exists, timeout=60, what="the line channel's delivery")
    [delivered] = [json.loads(line) for line in results.read_text().splitlines()]
    assert delivered["id"] == job_id and delivered["status"] == "done", delivered
    assert Path(delivered["primary"]).read_text() == "xof der a"

