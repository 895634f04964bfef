"""The upscale kind's table in config.toml, ``[upscale]``: light to import, since every
process reads it with the config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from daemon.config import Section


class UpscaleConfig(Section):
    # A local ESRGAN-family .pth (e.g. models/RealESRGAN_x4plus.pth), loaded with spandrel.
    model: Path | None = None
    # Tiles keep an 8 GB GPU enough for large images: core size, feathered overlap, and
    # context each tile sees beyond its core so edges match the whole-image result.
    tile: int = Field(default=192, ge=16, le=4096)
    tile_overlap: int = Field(default=16, ge=0, le=512)
    tile_context: int = Field(default=16, ge=0, le=512)
    # fp16/bf16 on a GPU when the model supports it (a NaN/Inf tile falls back to fp32).
    half: bool = True
    max_frames: int = Field(default=3000, ge=1)

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        if self.model is not None:
            self.model = resolve(self.model)


SETTINGS = {"upscale": UpscaleConfig}
