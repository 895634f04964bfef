"""The ``upscale`` kind: Real-ESRGAN-family super-resolution for images and videos.

Any ESRGAN-family ``.pth`` (RealESRGAN_x4plus and friends) is loaded through spandrel
from the local path in ``[upscale] model``. Top to bottom:

1. load the model (kept resident between jobs), in fp16/bf16 on a GPU that supports it;
2. images: tiled inference (``workers.tiling``): input and output stay on the CPU, only
   tiles go to the GPU; alpha is upscaled alongside, bit depth kept (16 in, 16 out);
3. videos: the same frame by frame, encoded to H.264 with the original audio kept;
4. write the result beside the untouched original, and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from daemon import files
from daemon.config import Config
from daemon.jobs import JobError
from workers import media, reports
from workers.context import JobContext, JobResult
from workers.device import GpuSettings, pick_device, pick_dtype
from workers.ladder import Rung
from workers.pipelines import encode
from workers.pipelines.upscale_settings import UpscaleConfig
from workers.residency import ModelWith, Residency
from workers.tiling import TilingReport, upscale_tiled

ROLE = "upscale"  # in the worker's Residency
INPUTS = media.IMAGE_SUFFIXES + media.VIDEO_SUFFIXES
IMAGE_OUTPUT = "result.upscaled.png"
VIDEO_OUTPUT = "result.upscaled.mp4"
VIDEO_CRF = 18
INSTALL_HINT = ("install one with `python scripts/fetch_models.py RealESRGAN_x4plus --dest "
                "models/` on a machine with hub access, then set [upscale] model = "
                "\"models/RealESRGAN_x4plus.pth\"")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tile: int | None = Field(default=None, ge=16, le=4096, description="default [upscale]")
    half: bool | None = Field(default=None, description="fp16/bf16 on a GPU; default [upscale]")


def check_request(prompt: str, options: Options) -> None:
    """Nothing to check across fields; the input is checked when it is read."""


def models(config: Config) -> dict[str, Path]:
    return {"[upscale] model": config.upscale.model} if config.upscale.model else {}


def unavailable(config: Config) -> str | None:
    return _model_problem(config.upscale)


def _model_problem(settings: UpscaleConfig) -> str | None:
    if settings.model is None:
        return f"this server has no upscaling model configured: {INSTALL_HINT}"
    if not settings.model.is_file():
        return f"[upscale] model = {str(settings.model)!r} does not exist: {INSTALL_HINT}"
    return None


@dataclass
class Upscaler(ModelWith):
    """A super-resolution network with its scale and the dtype it runs in."""

    scale: int
    dtype: Any


def load_upscaler(settings: UpscaleConfig, half: bool, gpu_config: GpuSettings,
                  resident: Residency) -> Upscaler:
    """The model of ``[upscale] model``, kept resident between jobs in ``resident`` (the
    worker's, ``job.gpu.resident``; role ``"upscale"``)."""
    import torch

    if problem := _model_problem(settings):
        raise JobError(problem)
    path = settings.model
    device = pick_device()
    # The half type this GPU runs best; the model may need a wider one (_runnable_dtype),
    # but the dtype asked for is what tells a later job it can reuse this model.
    dtype = pick_dtype(device) if half else torch.float32
    # Only the on-device rung: the offload rungs place diffusers pipelines, an ESRGAN
    # network is a few tens of MB, and tiled inference already bounds what it needs
    # beyond its weights. Other roles' models are parked to make room for it instead.
    acquired = resident.acquire(ROLE, path, dtype=dtype, device=device,
                                settings=gpu_config, rungs=(Rung.ON_DEVICE,),
                                load=lambda rung: _load(path, dtype, device))
    return acquired.resident.model


def _load(path: Path, dtype: Any, device: Any) -> Upscaler:
    try:
        import spandrel
    except ImportError as exc:
        raise JobError(
            f"the upscale kind loads models with spandrel, which cannot be imported here "
            f"({exc}); install spandrel and a torchvision build that matches your torch "
            "(pip install 'reelqueue[gpu]' on a GPU host)") from None
    descriptor = spandrel.ModelLoader(device=device).load_from_file(str(path))
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or \
            descriptor.input_channels != 3:
        raise JobError(f"{path.name} is not an RGB super-resolution model "
                       f"({type(descriptor).__name__}); use an ESRGAN-family .pth")
    dtype = _runnable_dtype(dtype, descriptor)
    network = descriptor.model.eval().to(device=device, dtype=dtype)
    return Upscaler(model=network, scale=descriptor.scale, dtype=dtype)


def _runnable_dtype(dtype: Any, descriptor: Any) -> Any:
    """``dtype``, or the next wider one where the architecture cannot run in it."""
    import torch

    if dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
        dtype = torch.float16
    if dtype == torch.float16 and not descriptor.supports_half:
        dtype = torch.float32
    return dtype


def upscale_image(model, scale: int, dtype, image: np.ndarray, settings: UpscaleConfig,
                  tile: int, job: JobContext, progress: tuple[float, float] = (10, 90)
                  ) -> tuple[np.ndarray, TilingReport]:
    """``image`` (RGB or RGBA, 8- or 16-bit) → the same kind of array, ``scale`` × larger."""
    bits = 16 if image.dtype == np.uint16 else 8
    rgb = media.to_float(image[..., :3])
    start, span = progress

    def on_tile(done: int, total: int) -> None:
        job.progress("upscale", start + span * done / total, f"tile {done} of {total}")

    device = next(model.parameters()).device
    out, report = upscale_tiled(model, rgb, scale, tile=tile, overlap=settings.tile_overlap,
                                context=settings.tile_context, device=device, dtype=dtype,
                                on_tile=on_tile)
    if image.shape[2] == 4:
        # Alpha is a mask, not a picture: a smooth resize keeps its edges honest.
        alpha = cv2.resize(media.to_float(image[..., 3]), (out.shape[1], out.shape[0]),
                           interpolation=cv2.INTER_CUBIC)
        out = np.dstack([out, np.clip(alpha, 0, 1)])
    return media.from_float(out, bits), report


def _upscale_video(model, scale, dtype, source: Path, settings: UpscaleConfig, tile: int,
                   job: JobContext) -> dict[str, object]:
    silent = job.dir / ".upscaled-video-only.mp4"
    frames = 0
    with media.open_video(source) as video:
        fps = video.fps or 25.0
        expected = max(1, round(video.duration_s * fps))
        if expected > settings.max_frames:
            raise JobError(f"{source.name} has about {expected} frames; the limit is "
                           f"{settings.max_frames} ([upscale] max_frames)")
        # H.264 in yuv420p needs even sizes.
        out_w, out_h = (video.width * scale) // 2 * 2, (video.height * scale) // 2 * 2
        fmt = encode.VideoFormat(width=out_w, height=out_h, fps=fps)
        with files.atomic_path(silent) as tmp, encode.clip_writer(tmp, fmt, VIDEO_CRF) as write:
            for frame in video.frames:
                span = (10 + 85 * frames / expected, 85 / expected)
                big, _ = upscale_image(model, scale, dtype, frame, settings, tile, job, span)
                write(np.ascontiguousarray(big[:out_h, :out_w]))
                frames += 1
    media.copy_audio(silent, source, job.dir / VIDEO_OUTPUT)
    silent.unlink(missing_ok=True)
    return {"frames": frames, "fps": fps, "width": out_w, "height": out_h}


def run(job: JobContext) -> JobResult:
    options = Options.model_validate(job.spec.options)
    settings = job.config.upscale
    if len(job.spec.inputs) != 1:
        raise JobError("an upscale job takes exactly one image or video")
    source = job.inputs_dir / job.spec.inputs[0]

    with job.stage("load"):
        job.progress("load", 0, "loading the model")
        half = settings.half if options.half is None else options.half
        upscaler = load_upscaler(settings, half, GpuSettings.from_config(job.config),
                                 job.gpu.resident)
        model, scale, dtype = upscaler.model, upscaler.scale, upscaler.dtype
    tile = options.tile or settings.tile

    with job.stage("upscale"):
        if source.suffix.lower() in media.VIDEO_SUFFIXES:
            details = _upscale_video(model, scale, dtype, source, settings, tile, job)
            output, previews = VIDEO_OUTPUT, {}
        else:
            image = media.read_image(source)
            result, tiling = upscale_image(model, scale, dtype, image, settings, tile, job)
            media.write_png(job.dir / IMAGE_OUTPUT, result)
            for step in tiling.steps_down:
                job.warn(step)
            details = {"width": result.shape[1], "height": result.shape[0],
                       "bits": 16 if result.dtype == np.uint16 else 8,
                       "alpha": result.shape[2] == 4, "tile": tiling.tile,
                       "tiles": tiling.tiles, "dtype": tiling.dtype}
            output, previews = IMAGE_OUTPUT, {"original": image, "upscaled": result}
    details |= {"scale": scale, "model": str(settings.model), "output": output}
    reports.write_still(job, options.model_dump(), details, previews, title="Upscale")
    job.progress("upscale", 100, f"{scale}× → {output}")
    return JobResult(primary=output)
