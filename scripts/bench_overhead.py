#!/usr/bin/env python3
"""What does the full stack cost over running the same job in-process?

Runs one video job two ways, alternating, N times each, in one run on one machine:

- in-process: ``workers.runner.run_job_sync`` (what ``reelqueue run`` does), warm;
- full stack: the job file renamed into a watched inbox → daemon → embedded Redis →
  worker → delivery into ``done/`` (timed until the video is there).

Prints the medians, their ratio, and the median latency from the file landing in the
inbox to the worker starting the job. Targets (issue: the backbone): ratio ≤ 1.10,
latency ≤ 1 s with an idle worker.

    .venv/bin/python scripts/bench_overhead.py [--runs 5] [--size 256x144] [--scenes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import load_config  # noqa: E402
from daemon.jobs import Channel, JobSpec, Source, new_job_id, write_spec  # noqa: E402
from daemon.logs import configure_logging  # noqa: E402
from daemon.queue import QueueClient  # noqa: E402
from daemon.supervisor import Supervisor  # noqa: E402
from intake.jobfile import parse_request  # noqa: E402
from workers.runner import run_job_sync  # noqa: E402

SENTENCES = ["A red fox runs through deep snow.", "The sun sets behind the hills.",
             "The fox turns and looks into the camera.", "Night falls over the forest.",
             "Stars come out one by one.", "The fox curls up to sleep."]


def job_file(run: int, args: argparse.Namespace) -> bytes:
    width, height = (int(v) for v in args.size.split("x"))
    job = {"prompt": " ".join(SENTENCES[: args.scenes]), "width": width, "height": height,
           "fps": args.fps, "duration": args.scenes * args.scene_seconds, "seed": run}
    return json.dumps(job).encode()


def in_process(config, run: int, args: argparse.Namespace) -> float:
    request = parse_request("bench.json", job_file(run, args), "video")
    spec = JobSpec(id=new_job_id(), kind=request.kind, prompt=request.prompt,
                   options=request.options, source=Source(channel=Channel.cli))
    write_spec(config.jobs_dir, spec)
    started = time.perf_counter()
    outcome = run_job_sync(spec, config)
    elapsed = time.perf_counter() - started
    assert outcome.status == "done", outcome.error
    return elapsed


def full_stack(config, run: int, args: argparse.Namespace) -> tuple[float, float]:
    inbox = config.intake.folder[0].path
    name = f"bench-{run}"
    tmp = inbox / f".{name}.json.part"
    tmp.write_bytes(job_file(run, args))
    landed = time.time()
    started = time.perf_counter()
    tmp.rename(inbox / f"{name}.json")
    video = inbox / "done" / f"{name}.mp4"
    while not video.exists():
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    report = json.loads((inbox / "done" / f"{name}.report.json").read_text())
    state = asyncio.run(_state(config, report["id"]))
    return elapsed, float(state["started_at"]) - landed


async def _state(config, job_id):
    queue = await QueueClient.open(_url(config))
    try:
        return await queue.get_state(job_id)
    finally:
        await queue.close()


def _url(config) -> str:
    from daemon.redis_server import EmbeddedRedis

    return config.redis.url or EmbeddedRedis(config.state_dir).url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="256x144")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--scene-seconds", type=float, default=3.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="reelqueue-bench-"))
    config_path = workdir / "config.toml"
    config_path.write_text('[state]\ndir = "var"\n[log]\nlevel = "warning"\nformat = "json"\n'
                           '[[intake.folder]]\npath = "inbox"\n')
    config = load_config(config_path)
    configure_logging("warning", "json")
    config.intake.folder[0].path.mkdir(parents=True)
    supervisor = Supervisor(config, config_path)
    supervisor.start()
    try:
        asyncio.run(_wait_for_worker(config))
        # One untimed run each way to warm caches, imports and the font.
        in_process(config, -1, args)
        full_stack(config, -1, args)
        inproc, stack, latency = [], [], []
        for run in range(args.runs):
            inproc.append(in_process(config, run, args))
            elapsed, start_latency = full_stack(config, run, args)
            stack.append(elapsed)
            latency.append(start_latency)
            print(f"run {run + 1}: in-process {inproc[-1]:.3f} s, full stack {elapsed:.3f} s, "
                  f"file→start {start_latency * 1000:.0f} ms", flush=True)
    finally:
        supervisor.stop()
    a, b, lat = statistics.median(inproc), statistics.median(stack), statistics.median(latency)
    print()
    print(f"job: {args.scenes} scenes, {args.scenes * args.scene_seconds:g} s, {args.size} "
          f"@ {args.fps} fps; {args.runs} runs each, alternating")
    print(f"{'median in-process (reelqueue run)':<40}{a:8.3f} s")
    print(f"{'median full stack (drop → done/)':<40}{b:8.3f} s")
    print(f"{'ratio full stack / in-process':<40}{b / a:8.3f}   (target ≤ 1.10)")
    print(f"{'median file landed → job started':<40}{lat * 1000:8.0f} ms (target ≤ 1000)")
    return 0


async def _wait_for_worker(config) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            queue = await QueueClient.open(_url(config))
        except Exception:
            await asyncio.sleep(0.2)
            continue
        try:
            if await queue.workers():
                return
        finally:
            await queue.close()
        await asyncio.sleep(0.2)
    raise SystemExit("no worker came up within 60 s")


if __name__ == "__main__":
    sys.exit(main())
