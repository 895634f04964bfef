#!/usr/bin/env python3
"""How fast does the HTTP API take jobs?

Starts the embedded Redis and a real daemon (no worker: the queue only fills), then
sends N ``POST /jobs`` from C concurrent clients on loopback. Prints requests per
second, p50/p99 latency, and checks that exactly N jobs were queued; twice, side by
side: with the embedded Redis fsyncing every second, and before every acknowledgement
(``[redis] appendfsync = "always"``, the default), which prices durable acceptance.

    .venv/bin/python scripts/bench_http.py [--requests 2000] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.cli import open_queue  # noqa: E402
from daemon.compose import read_config  # noqa: E402
from daemon.redis_server import EmbeddedRedis  # noqa: E402

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def client(session, base, jobs: asyncio.Queue, latencies: list[float],
                 statuses: dict[int, int]) -> None:
    while True:
        try:
            n = jobs.get_nowait()
        except asyncio.QueueEmpty:
            return
        body = {"kind": "video", "prompt": f"a red fox, take {n}", "options": {"duration": 6}}
        started = time.perf_counter()
        async with session.post(f"{base}/jobs", json=body) as response:
            await response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
        latencies.append(time.perf_counter() - started)


async def wait_up(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"{base}/healthz") as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise SystemExit("the daemon's HTTP API did not come up")


async def run(args: argparse.Namespace, base: str) -> tuple[list[float], dict[int, int], float]:
    await wait_up(base)
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for n in range(args.requests):
        jobs.put_nowait(n)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=args.clients)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, base, jobs, latencies, statuses)
                               for _ in range(args.clients)))
        elapsed = time.perf_counter() - started
    return latencies, statuses, elapsed


async def queued(config) -> int:
    queue = await open_queue(config)
    try:
        return await queue.queue_length()
    finally:
        await queue.close()


def measure(args: argparse.Namespace, appendfsync: str) -> dict[str, object]:
    """One fresh daemon and embedded Redis with this fsync setting; N POSTs."""
    workdir = Path(tempfile.mkdtemp(prefix="reelqueue-bench-http-"))
    port = free_port()
    config_path = workdir / "config.toml"
    config_path.write_text(
        f'[state]\ndir = "var"\n[redis]\nappendfsync = "{appendfsync}"\n'
        '[log]\nlevel = "warning"\nformat = "json"\n'
        '[[intake.folder]]\npath = "inbox"\n'
        f'[intake.http]\nlisten = "127.0.0.1:{port}"\n'
        f'[[intake.http.tokens]]\nname = "bench"\ntoken = "{TOKEN}"\n')
    config = read_config(config_path)
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config_path),
                               "daemon"], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        latencies, statuses, elapsed = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
        in_queue = asyncio.run(queued(config))
    finally:
        daemon.terminate()
        daemon.wait(30)
        EmbeddedRedis(config.state_dir).stop(only_if_idle=False)
    latencies.sort()
    return {"rps": args.requests / elapsed, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "statuses": statuses, "queued": in_queue}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    results = {fsync: measure(args, fsync) for fsync in ("everysec", "always")}
    print(f"\n{args.requests} POST /jobs from {args.clients} concurrent clients on loopback "
          "(no worker running), embedded Redis")
    print(f"{'appendfsync':<13}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'queued':>8}  responses")
    for fsync, r in results.items():
        print(f"{fsync:<13}{r['rps']:>8.0f}{r['p50'] * 1000:>9.1f}{r['p99'] * 1000:>9.1f}"
              f"{r['queued']:>8}  {r['statuses']}")
    cost = results["everysec"]["rps"] / results["always"]["rps"]
    print(f"durable acknowledgement (always vs everysec): throughput × {1 / cost:.2f}")
    ok = all(r["queued"] == args.requests and r["statuses"] == {202: args.requests}
             for r in results.values())
    print("exactly", args.requests, "jobs queued each time" if ok else "— MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
