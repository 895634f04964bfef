"""The ``caption`` kind: a video → a sentence describing it, and one per shot.

With a GIT video-captioning checkpoint (e.g. git-base-vatex) from a local folder,
through transformers. Top to bottom:

1. read the video at a few frames per second (enough to find shot changes);
2. find shots: a cut is where the colour histogram of consecutive frames changes;
3. caption the whole clip: the model's frame count, sampled evenly, fed as one 5-D clip
   (batch, frames, channels, height, width);
4. caption each shot the same way, when there are several;
5. write ``result.caption.txt`` and a report with the sampled frames.
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
from workers.residency import ModelWith, Residency

ROLE = "caption"  # in the worker's Residency
INPUTS = media.VIDEO_SUFFIXES
OUTPUT_FILE = "result.caption.txt"
SAMPLES_PER_SECOND = 4.0  # frames kept for shot detection and sampling
MAX_KEPT_FRAMES = 2400
KEPT_MAX_SIDE = 448  # frames are kept small: the model's input is 224 px or less
CUT_CORRELATION = 0.5  # histogram correlation below this between frames is a cut
MIN_SHOT_S = 1.0


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_shot: bool = Field(default=True, description="also caption each shot")
    max_length: int | None = Field(default=None, ge=5, le=200,
                                   description="tokens per caption; default [caption]")


def check_request(prompt: str, options: Options) -> None:
    """Nothing to check across fields; the video is checked when it is read."""


def models(config: Config) -> dict[str, Path]:
    return {"[caption] model": config.caption.model} if config.caption.model else {}


def unavailable(config: Config) -> str | None:
    return _model_problem(config.caption.model)


def _model_problem(model_dir: Path | None) -> str | None:
    if model_dir is None:
        return ("this server has no captioning model configured: set [caption] model to a "
                "local GIT checkpoint folder, e.g. models/git-base-vatex (install it with "
                "`python scripts/fetch_models.py git-base-vatex --dest models/` on a machine "
                "with hub access)")
    if not (model_dir / "config.json").is_file():
        return (f"[caption] model = {str(model_dir)!r} is not a model folder (no "
                "config.json); install it with `python scripts/fetch_models.py "
                f"{model_dir.name} --dest {model_dir.parent}/`")
    return None


@dataclass
class Footage:
    frames: list[np.ndarray]  # RGB uint8, at about SAMPLES_PER_SECOND
    times: list[float]  # seconds
    duration_s: float


def read_footage(path: Path) -> Footage:
    """Decode the video, keeping about ``SAMPLES_PER_SECOND`` small frames."""
    frames, times = [], []
    with media.open_video(path) as video:
        fps = video.fps or 25.0
        stride = max(1, round(fps / SAMPLES_PER_SECOND))
        scale = min(1.0, KEPT_MAX_SIDE / max(video.width, video.height))
        for index, frame in enumerate(video.frames):
            if index % stride:
                continue
            if scale < 1.0:
                frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            frames.append(frame)
            times.append(index / fps)
            if len(frames) >= MAX_KEPT_FRAMES:
                break
    if not frames:
        raise JobError(f"{path.name} has no video frames")
    return Footage(frames, times, video.duration_s or times[-1])


def find_shots(frames: list[np.ndarray], times: list[float]) -> list[tuple[int, int]]:
    """Shots as [start, end) index ranges: a cut where colour histograms stop agreeing."""
    def histogram(frame: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [32, 32], [0, 180, 0, 256])
        return cv2.normalize(hist, hist).flatten()

    cuts = [0]
    previous = histogram(frames[0])
    for index in range(1, len(frames)):
        current = histogram(frames[index])
        if (cv2.compareHist(previous, current, cv2.HISTCMP_CORREL) < CUT_CORRELATION
                and times[index] - times[cuts[-1]] >= MIN_SHOT_S):
            cuts.append(index)
        previous = current
    return list(zip(cuts, cuts[1:] + [len(frames)], strict=True))


def sample_evenly(start: int, end: int, count: int) -> list[int]:
    """``count`` indices spread evenly over [start, end) (repeating when it is short)."""
    return [int(i) for i in np.linspace(start, end - 1, count).round()]


@dataclass
class Captioner(ModelWith):
    """The GIT model and its processor."""

    processor: Any


def load_captioner(model_dir: Path | None, gpu_config: GpuSettings,
                   resident: Residency) -> Captioner:
    """The captioning model, kept resident between jobs in ``resident`` (the worker's,
    ``job.gpu.resident``; role ``"caption"``)."""
    if problem := _model_problem(model_dir):
        raise JobError(problem)
    assert model_dir is not None
    device = pick_device()
    dtype = pick_dtype(device)
    # Only the on-device rung: the offload rungs place diffusers pipelines, and a GIT
    # checkpoint is a single transformers model of a few hundred MB. Other roles'
    # models are parked to make room for it instead.
    acquired = resident.acquire(ROLE, model_dir, dtype=dtype, device=device,
                                settings=gpu_config, rungs=(Rung.ON_DEVICE,),
                                load=lambda rung: _load(model_dir, dtype, device))
    return acquired.resident.model


def _load(model_dir: Path, dtype: Any, device: Any) -> Captioner:
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    return Captioner(model=model.to(device).eval(), processor=processor)


def caption_frames(processor, model, frames: list[np.ndarray], max_length: int) -> str:
    import torch

    count = getattr(model.config, "num_image_with_embedding", None) or 1
    pixels = processor(images=frames, return_tensors="pt").pixel_values
    if count > 1:
        # A video model takes the clip as one sample: (batch, frames, channels, h, w).
        pixels = pixels.unsqueeze(0)
        if pixels.ndim != 5 or pixels.shape[1] != count:
            raise RuntimeError(f"expected a (1, {count}, C, H, W) clip, got {tuple(pixels.shape)}")
    pixels = pixels.to(device=model.device, dtype=model.dtype)
    with torch.inference_mode():
        tokens = model.generate(pixel_values=pixels, max_length=max_length)
    return processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()


def run(job: JobContext) -> JobResult:
    options = Options.model_validate(job.spec.options)
    settings = job.config.caption
    max_length = options.max_length or settings.max_length
    if len(job.spec.inputs) != 1:
        raise JobError("a caption job takes exactly one video")

    with job.stage("load"):
        job.progress("load", 0, "loading the captioning model")
        captioner = load_captioner(settings.model, GpuSettings.from_config(job.config),
                                   job.gpu.resident)
        processor, model = captioner.processor, captioner.model
        count = getattr(model.config, "num_image_with_embedding", None) or 1

    with job.stage("read"):
        job.progress("read", 10, "reading the video")
        footage = read_footage(job.inputs_dir / job.spec.inputs[0])
        shots = find_shots(footage.frames, footage.times)[: settings.max_shots]

    with job.stage("caption"):
        job.progress("caption", 30, "captioning the clip")
        whole = sample_evenly(0, len(footage.frames), count)
        caption = caption_frames(processor, model, [footage.frames[i] for i in whole],
                                 max_length)
        shot_lines = []
        if options.per_shot and len(shots) > 1:
            for number, (start, end) in enumerate(shots, start=1):
                job.progress("caption", 30 + 65 * number / len(shots),
                             f"shot {number} of {len(shots)}")
                picked = [footage.frames[i] for i in sample_evenly(start, end, count)]
                shot_lines.append({
                    "shot": number,
                    "start_s": round(footage.times[start], 2),
                    "end_s": round(footage.times[end - 1], 2),
                    "caption": caption_frames(processor, model, picked, max_length),
                })

    text = caption + "\n" + "".join(
        f"shot {s['shot']} ({s['start_s']:.1f}–{s['end_s']:.1f} s): {s['caption']}\n"
        for s in shot_lines)
    files.write_text(job.dir / OUTPUT_FILE, text)
    details = {
        "caption": caption,
        "shots": shot_lines,
        "model": str(settings.model),
        "frames_per_caption": count,
        "sampled_s": [round(footage.times[i], 2) for i in whole],
        "duration_s": round(footage.duration_s, 2),
    }
    thumbnails = {f"frame at {footage.times[i]:.1f} s": footage.frames[i] for i in whole}
    reports.write_still(job, options.model_dump(), details, thumbnails, title="Caption",
                        text=caption)
    job.progress("caption", 100, caption[:80])
    return JobResult(primary=OUTPUT_FILE)
