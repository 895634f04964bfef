"""Post-production benchmark, measured side by side in one run.

1. In-between frames on a clip whose truth is known: a textured background panning
   and a textured block crossing it (tests/test_post_picture.py renders it), made at
   twice the frame rate; every other frame is dropped and made again, by plain
   blending and by optical flow (without and with the occlusion-aware weights). PSNR
   against the dropped frames; higher is better.
2. The post stage's time per minute of video at the default size (832×480, 16 fps):
   one animatic job is rendered once, then post runs again on its kept clips with
   different settings (the clips are reused, so only post is timed).

    .venv/bin/python scripts/bench_post.py [--seconds 60] [--pairs 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import StateConfig  # noqa: E402
from daemon.jobs import JobSpec, Source  # noqa: E402
from tests.test_post_picture import moving_pattern, psnr  # noqa: E402
from workers.pipelines import (
    config_class,
    interpolate,  # noqa: E402
)
from workers.runner import run_job_sync  # noqa: E402

Config = config_class()  # the core's tables and the kinds'

WIDTH, HEIGHT, FPS = 832, 480, 16
PROMPT = ("A fox runs through the snow. It stops and listens. It looks back at the camera. "
          "The sun sets behind the hills. Night falls over the valley. Stars appear. "
          "The fox curls up to sleep. Dawn comes, pale and cold.")
SETTINGS = [
    ("cut, no subtitles, no look", {"transition": "cut", "subtitles": "off"}),
    ("defaults: crossfade, burned subtitles", {}),
    ('+ look "natural" (denoise, white balance, CLAHE)', {"look": "natural"}),
    ('+ look "warm"', {"look": "warm"}),
    ("+ smooth_motion 2 (32 fps by optical flow)", {"smooth_motion": 2}),
]


def interpolation_psnr(pairs: int) -> dict[str, float]:
    truth = moving_pattern(WIDTH, HEIGHT, 2 * pairs + 1)
    scores: dict[str, list[float]] = {"blend": [], "flow, unweighted": [],
                                      "flow, occlusion-aware (used)": []}
    seconds = 0.0
    for index in range(0, 2 * pairs, 2):
        first, middle, second = truth[index], truth[index + 1], truth[index + 2]
        scores["blend"].append(psnr(cv2.addWeighted(first, 0.5, second, 0.5, 0), middle))
        started = time.perf_counter()
        pair = interpolate.FlowPair(first, second)
        scores["flow, occlusion-aware (used)"].append(psnr(pair.at(0.5), middle))
        seconds += time.perf_counter() - started
        weights = interpolate.CONSISTENCY_PX
        interpolate.CONSISTENCY_PX = float("inf")  # every fetch trusted alike: a plain mix
        scores["flow, unweighted"].append(psnr(pair.at(0.5), middle))
        interpolate.CONSISTENCY_PX = weights
    print(f"In-between frames, {WIDTH}×{HEIGHT}, {pairs} frames with known truth "
          f"(flow: {1000 * seconds / pairs:.0f} ms per frame pair, both directions)")
    print(f"  {'method':<32}{'PSNR dB':>9}")
    for name, values in scores.items():
        print(f"  {name:<32}{np.mean(values):>9.2f}")
    return {name: float(np.mean(values)) for name, values in scores.items()}


def post_seconds_per_minute(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as state:
        config = Config(state=StateConfig(dir=Path(state)))

        def run(options: dict[str, object]) -> dict[str, float]:
            spec = JobSpec(id="bench", kind="video", prompt=PROMPT,
                           options={"duration": seconds, **options},
                           source=Source(channel="cli"))
            outcome = run_job_sync(spec, config)
            if outcome.error:
                sys.exit(f"the benchmark job failed: {outcome.error}")
            report = (config.jobs_dir / "bench" / "report.json").read_text(encoding="utf-8")
            return json.loads(report)["timings"]

        first = run({})
        print(f"\nPost stage, {seconds:g} s of video at {WIDTH}×{HEIGHT}, {FPS} fps "
              f"(render once: {first['render']:.1f} s, then reused)")
        print(f"  {'settings':<52}{'post s':>8}{'s per min':>11}")
        for name, options in SETTINGS:
            post = run(options)["post"]
            print(f"  {name:<52}{post:>8.1f}{post * 60 / seconds:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="video length (3–64)")
    parser.add_argument("--pairs", type=int, default=12, help="frames to rebuild")
    args = parser.parse_args()
    interpolation_psnr(args.pairs)
    post_seconds_per_minute(args.seconds)


if __name__ == "__main__":
    main()
