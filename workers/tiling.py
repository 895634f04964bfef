"""Tiled inference for image-to-image models (super-resolution): the image and the
result stay on the CPU, only one tile at a time goes to the device.

Each tile covers a core region plus ``context`` pixels around it, so the model sees
what it would see on the whole image; the output is cropped back to the core grown by
half the ``overlap``, and neighbouring tiles are blended with linear ramps across the
overlap, so no seam shows. On CUDA out-of-memory the tile size halves and the image
starts over; in half precision a tile that comes out with NaN or Inf is redone in
float32, and so is the rest of the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

MIN_TILE = 16


@dataclass
class TilingReport:
    tile: int  # the tile size that finished the image
    tiles: int
    dtype: str
    steps_down: list[str] = field(default_factory=list)


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1 inside, rising over ``overlap`` at edges shared with a neighbour."""
    weights = np.ones(length, np.float32)
    band = min(overlap, length // 2)
    if band:
        ramp = (np.arange(band, dtype=np.float32) + 0.5) / band
        if not at_start:
            weights[:band] = ramp
        if not at_end:
            weights[-band:] = ramp[::-1]
    return weights


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _run_tiles(model: torch.nn.Module, image: np.ndarray, scale: int, tile: int,
               overlap: int, context: int, device: torch.device, dtype: torch.dtype,
               on_tile: Callable[[int, int], None]) -> tuple[np.ndarray, int, bool]:
    """One pass over the image. Returns (output, tiles, whether half precision failed)."""
    height, width, channels = image.shape
    out = np.zeros((height * scale, width * scale, channels), np.float32)
    weight = np.zeros((height * scale, width * scale, 1), np.float32)
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)
    total, done = len(ys) * len(xs), 0
    for y in ys:
        for x in xs:
            y1, x1 = min(y + tile, height), min(x + tile, width)
            # The model sees the core plus context; we keep the core.
            cy0, cx0 = max(0, y - context), max(0, x - context)
            cy1, cx1 = min(height, y1 + context), min(width, x1 + context)
            patch = torch.from_numpy(np.ascontiguousarray(
                image[cy0:cy1, cx0:cx1].transpose(2, 0, 1)))[None]
            with torch.inference_mode():
                result = model(patch.to(device=device, dtype=dtype)).float()
                if dtype != torch.float32 and not torch.isfinite(result).all():
                    return out, done, True
                result = result[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            top, left = (y - cy0) * scale, (x - cx0) * scale
            core = result[top:top + (y1 - y) * scale, left:left + (x1 - x) * scale]
            wy = _ramp(core.shape[0], overlap * scale, y == 0, y1 == height)
            wx = _ramp(core.shape[1], overlap * scale, x == 0, x1 == width)
            w = (wy[:, None] * wx[None, :])[..., None]
            out[y * scale:y1 * scale, x * scale:x1 * scale] += core * w
            weight[y * scale:y1 * scale, x * scale:x1 * scale] += w
            done += 1
            on_tile(done, total)
    return out / np.maximum(weight, 1e-8), total, False


def upscale_tiled(model: torch.nn.Module, image: np.ndarray, scale: int, *, tile: int,
                  overlap: int, context: int, device: torch.device,
                  dtype: torch.dtype = torch.float32,
                  on_tile: Callable[[int, int], None] = lambda done, total: None,
                  ) -> tuple[np.ndarray, TilingReport]:
    """Upscale ``image`` (H×W×C float32 in [0, 1], on the CPU) by ``scale`` in tiles."""
    report = TilingReport(tile=tile, tiles=0, dtype=str(dtype).removeprefix("torch."))
    while True:
        try:
            out, tiles, half_failed = _run_tiles(model, image, scale, tile, overlap, context,
                                                 device, dtype, on_tile)
        except torch.OutOfMemoryError:
            if tile // 2 < MIN_TILE:
                raise
            torch.cuda.empty_cache()
            report.steps_down.append(f"out of memory at tile {tile}; trying {tile // 2}")
            tile //= 2
            report.tile = tile
            continue
        if half_failed:
            report.steps_down.append(f"{report.dtype} gave NaN/Inf; redone in float32")
            model.float()
            dtype = torch.float32
            report.dtype = "float32"
            continue
        report.tiles = tiles
        return out, report
