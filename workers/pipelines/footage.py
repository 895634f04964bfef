"""The ``diffusers`` render backend for the ``video`` kind: one scene clip from a local
text-to-video model (``workers.pipelines.diffusion``), kept in the job folder and
reused by a restarted job exactly like the animatic's clips.

With continuity on, a scene starts from the previous scene's last frame; the clip's
cache key then includes the previous clip's, so a re-rendered scene re-renders those
after it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon import files
from daemon.config import Config
from daemon.storyboard import Storyboard, StoryboardScene
from workers import models
from workers.context import JobContext
from workers.device import GpuSettings
from workers.pipelines import diffusion, encode
from workers.pipelines.animatic import SCENES_DIR, SceneClip, thumbnail_jpeg
from workers.pipelines.llm_storyboard import video_prompt

CLIP_VERSION = 1  # bump when anything here changes the pixels of a clip


@dataclass
class Rendered:
    clip: SceneClip
    key: str
    last_frame: np.ndarray | None
    details: dict[str, Any]  # for the report: model, rung, steps, timings; empty if reused


def settings_for(config: Config) -> diffusion.DiffusionSettings:
    """``[video]`` as the diffusion settings, with models found (and checked) on disk."""
    video = config.video
    continuity_model = video.continuity_model
    return diffusion.DiffusionSettings(
        model_dir=models.require(config.models.dir, video.model),
        steps=video.steps or None,
        continuity=video.continuity,
        i2v_model_dir=models.require(config.models.dir, continuity_model)
        if continuity_model else None,
        gpu=GpuSettings.from_config(config),
    )


def clip_key(board: Storyboard, scene: StoryboardScene, fmt: encode.VideoFormat,
             settings: diffusion.DiffusionSettings, previous_key: str) -> str:
    data = {"version": CLIP_VERSION, "prompt": video_prompt(scene, board.style),
            "frames": scene.frames, "seed": board.seed, "size": [fmt.width, fmt.height],
            "fps": fmt.fps, "model": settings.model_dir.name, "steps": settings.steps,
            "continuity": settings.continuity, "after": previous_key}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def render_scene(job: JobContext, board: Storyboard, scene: StoryboardScene,
                 fmt: encode.VideoFormat, settings: diffusion.DiffusionSettings,
                 previous: Rendered | None,
                 on_progress: Callable[[diffusion.RenderProgress], None]) -> Rendered:
    """Render ``scene`` with the video model, or reuse the clip a previous run left."""
    continuing = settings.continuity and previous is not None
    key = clip_key(board, scene, fmt, settings, previous.key if continuing else "")
    path = job.dir / SCENES_DIR / f"scene_{scene.number:02d}-{key}.mp4"
    thumbnail = path.with_suffix(".jpg")
    if path.is_file() and thumbnail.is_file():
        job.log("reusing scene clip", scene=scene.number, clip=path.name)
        last = diffusion.last_frame_of_clip(path, fmt.width, fmt.height) \
            if settings.continuity else None
        return Rendered(SceneClip(path, thumbnail), key, last, {})

    middle = scene.frames // 2
    written = 0

    def keep_thumbnail(write: Callable[[np.ndarray], None]) -> Callable[[np.ndarray], None]:
        def sink(frame: np.ndarray) -> None:
            nonlocal written
            if written == middle:
                files.write_bytes(thumbnail, thumbnail_jpeg(frame))
            write(frame)
            written += 1
        return sink

    frames_after = sum(s.frames for s in board.scenes if s.number > scene.number)
    request = diffusion.SceneRequest(
        number=scene.number, scenes=len(board.scenes), prompt=video_prompt(scene, board.style),
        frames=scene.frames, fps=fmt.fps, width=fmt.width, height=fmt.height, seed=board.seed,
        first_frame=previous.last_frame if continuing and previous else None,
        frames_after=frames_after)
    with files.atomic_path(path) as tmp, encode.clip_writer(tmp, fmt) as write:
        result = diffusion.render_scene(request, settings, keep_thumbnail(write), on_progress,
                                        resident=job.gpu.resident)
    job.log("rendered scene clip", scene=scene.number, clip=path.name, rung=result.rung,
            denoise_s=round(result.denoise_s, 3), load_s=round(result.load_s, 3))
    for step in result.step_downs:
        job.warn(f"scene {scene.number}: out of GPU memory on {step.from_rung}, finished on "
                 f"{step.to_rung} ({step.error})")
    return Rendered(SceneClip(path, thumbnail), key, result.last_frame, result.report())
