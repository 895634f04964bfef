#!/usr/bin/env python3
"""What does the full stack cost over running the same job in-process?

Runs one video job two ways, alternating, N times each, in one run on one machine:

- in-process: ``workers.runner.run_job_sync`` (what ``reelqueue run`` does), warm;
- full stack: the job file renamed into a watched inbox → daemon → embedded Redis →
  worker → delivery into ``done/`` (timed until the video is there).

Prints the medians, their ratio, and the median latency from the file landing in the
inbox to the worker starting the job. Targets (issue: the backbone): ratio ≤ 1.10,
latency ≤ 1 s with an idle worker.

    .venv/bin/python scripts/bench_overhead.py [--runs 5] [--size 256x144 --size 832x480]
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

from daemon.cli import open_queue, wait_for_worker  # noqa: E402
from daemon.compose import read_config  # noqa: E402
from daemon.jobs import Channel, JobSpec, Source, new_job_id, write_spec  # noqa: E402
from daemon.logs import configure_logging  # noqa: E402
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
    name = f"bench-{args.size}-{run}"
    tmp = inbox / f".{name}.json.part"
    tmp.write_bytes(job_file(run, args))
    landed = time.time()
    started = time.perf_counter()
    tmp.rename(inbox / f"{name}.json")
    delivered = inbox / "done" / f"{name}.json"  # the request moves last, after the results
    while not delivered.exists():
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    report = json.loads((inbox / "done" / f"{name}.report.json").read_text())
    state = asyncio.run(_state(config, report["id"]))
    return elapsed, float(state["started_at"]) - landed


async def _state(config, job_id):
    queue = await open_queue(config)
    try:
        return await queue.get_state(job_id)
    finally:
        await queue.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", action="append",
                        help="WxH; repeat for several (default: 256x144 and 832x480)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--scene-seconds", type=float, default=3.0)
    args = parser.parse_args()
    sizes = args.size or ["256x144", "832x480"]

    workdir = Path(tempfile.mkdtemp(prefix="reelqueue-bench-"))
    config_path = workdir / "config.toml"
    config_path.write_text('[state]\ndir = "var"\n[log]\nlevel = "warning"\nformat = "json"\n'
                           '[[intake.folder]]\npath = "inbox"\n')
    config = read_config(config_path)
    configure_logging("warning", "json")
    config.intake.folder[0].path.mkdir(parents=True)
    supervisor = Supervisor(config, config_path)
    supervisor.start()
    rows = []
    try:
        asyncio.run(_wait_for_worker(config))
        for size in sizes:
            args.size = size
            # One untimed run each way to warm imports, caches and the font.
            in_process(config, 0, args)
            full_stack(config, 0, args)
            inproc, stack, latency = [], [], []
            for run in range(1, args.runs + 1):
                inproc.append(in_process(config, run, args))
                elapsed, start_latency = full_stack(config, run, args)
                stack.append(elapsed)
                latency.append(start_latency)
                print(f"{size} run {run}: in-process {inproc[-1]:.3f} s, full stack "
                      f"{elapsed:.3f} s, file→start {start_latency * 1000:.0f} ms", flush=True)
            rows.append((size, statistics.median(inproc), statistics.median(stack),
                         statistics.median(latency)))
    finally:
        supervisor.stop()
    print(f"\njob: {args.scenes} scenes, {args.scenes * args.scene_seconds:g} s @ {args.fps} fps; "
          f"{args.runs} runs each way, alternating; medians")
    print(f"{'size':>9} {'in-process':>11} {'full stack':>11} {'ratio':>7} {'file→start':>11}")
    for size, a, b, lat in rows:
        print(f"{size:>9} {a:>9.3f} s {b:>9.3f} s {b / a:>7.3f} {lat * 1000:>8.0f} ms")
    print("targets: ratio ≤ 1.10, file→start ≤ 1000 ms")
    return 0


async def _wait_for_worker(config) -> None:
    queue = await wait_for_worker(config, timeout_s=60)
    await queue.close()


if __name__ == "__main__":
    sys.exit(main())
