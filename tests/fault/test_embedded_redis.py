"""The embedded Redis when two processes start it at once: a daemon and a worker
restarted together (by hand, by a supervisor after a crash, as the chaos test does
now and then) both find no server and both call ``ensure_redis``. There must still be
exactly one redis-server on the state dir: two would share one AOF, and whichever lost
the socket path would keep running unseen, holding it."""

from __future__ import annotations

import threading

import pytest

from daemon.redis_server import ensure_redis
from tests.fault.stack import redis_servers_of, stop_redis_servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def test_two_processes_starting_the_embedded_redis_at_once_get_one_server(tmp_path):
    state_dir = tmp_path / "var"
    # Threads stand in for the two processes: what matters is that both look for a
    # running server before either has started one, and the barrier makes sure.
    together = threading.Barrier(2)
    urls: list[str] = []

    def start_like_a_process() -> None:
        together.wait()
        urls.append(ensure_redis(state_dir, "", "always")[0])

    starters = [threading.Thread(target=start_like_a_process) for _ in range(2)]
    try:
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join(30)
        servers = redis_servers_of(state_dir)
    finally:
        stop_redis_servers(state_dir)
    assert len(urls) == 2 and len(set(urls)) == 1
    assert len(servers) == 1, f"{len(servers)} redis-servers on one state dir: {servers}"
