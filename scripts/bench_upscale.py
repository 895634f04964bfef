#!/usr/bin/env python3
"""Upscaling speed and memory against tile size, side by side in one run.

Builds RealESRGAN_x4plus's architecture (23 RRDB blocks, 64 features, growth 32) with
random weights — same compute as the real model, no download — and upscales one image
with several tile sizes: input megapixels per second, and peak memory (GPU: torch's
peak allocation; CPU: the process's peak resident memory above the start).

    .venv/bin/python scripts/bench_upscale.py [--size 256x256] [--tiles 64,128,192]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rrdbnet import RRDBNet  # noqa: E402
from workers.tiling import upscale_tiled  # noqa: E402


class PeakRss:
    """Samples this process's resident memory in the background."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak - self.base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=None, help="default: 1024x1024 on a GPU, 96x96 "
                        "on the CPU (the full model takes minutes per megapixel there)")
    parser.add_argument("--tiles", default=None, help="default: 128,192,256,512 on a GPU, "
                        "32,48,96 on the CPU")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    size = args.size or ("1024x1024" if on_gpu else "96x96")
    tiles = args.tiles or ("128,192,256,512" if on_gpu else "32,48,96")
    width, height = (int(v) for v in size.split("x"))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = RRDBNet(blocks=23, features=64, growth=32).eval().to(device=device, dtype=dtype)
    image = np.random.default_rng(0).random((height, width, 3), np.float32)
    megapixels = width * height / 1e6
    upscale_tiled(model, image[:32, :32], 4, tile=32, overlap=8, context=8, device=device,
                  dtype=dtype)  # warm-up
    print(f"RealESRGAN_x4plus architecture, random weights; {width}×{height} → "
          f"{width * 4}×{height * 4} on {device} ({str(dtype).removeprefix('torch.')})")
    print(f"{'tile':>6} {'tiles':>6} {'seconds':>9} {'MP/s in':>10} {'peak memory':>12}")
    for tile in (int(t) for t in tiles.split(",")):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            rss = PeakRss()
        started = time.perf_counter()
        _, report = upscale_tiled(model, image, 4, tile=tile, overlap=16, context=16,
                                  device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = rss.stop()
        elapsed = time.perf_counter() - started
        print(f"{tile:>6} {report.tiles:>6} {elapsed:>9.2f} {megapixels / elapsed:>10.5f} "
              f"{peak / 2**20:>9.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
