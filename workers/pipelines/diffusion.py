"""The ``diffusers`` render backend: one scene of a storyboard from a local video model.

``render_scene`` turns one scene into RGB frames at the job's size and frame rate and
hands them, in order, to a frame sink (the lead's clip writer). On the way:

- The model is a local diffusers folder of a known family, driven by that family's
  rules (``workers.pipelines.diffusion_families``).
- Duration → frames: the scene's length is generated at the model's native rate, in
  several generations when it is longer than one takes (``diffusion_plan``), joined in
  order, resampled to the job's rate (the nearest generated frame in time) and resized
  to the job's size when the model needed another.
- Continuity: with an image-to-video pipeline a generation continues from a frame:
  the previous scene's last frame starts the next scene, and a long scene's later
  generations start from the one before (the repeated first frame is dropped). The
  image-to-video pipeline is the text-to-video weights themselves where they can do
  it (``LTXImageToVideoPipeline``; ``WanImageToVideoPipeline`` for Wan 2.2 TI2V), or a
  separate model (``i2v_model_dir``, e.g. Wan2.1-I2V-14B). Without one, scenes and
  generations start afresh.
- The GPU: bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU; the memory
  ladder and model residency of ``workers.ladder`` and ``workers.residency``; an
  out-of-memory error steps one rung down and generates that part again, and the
  report lists every step down.
- Progress and cancel: the pipeline's ``callback_on_step_end`` reports scene i/n, step
  j/m and an ETA to ``on_progress``; an exception raised there (a cancel) leaves the
  denoising loop at once, the pipeline's hooks are reset, and it propagates.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from daemon.jobs import JobError
from workers.device import GpuSettings, empty_cache, pick_device, pick_dtype
from workers.gpu import GpuOutOfMemory, is_out_of_memory, one_line
from workers.ladder import Rung
from workers.pipelines.diffusion_families import (
    IMAGE_TO_VIDEO,
    TEXT_TO_VIDEO,
    check_pipeline_class,
    check_requirements,
    compose_pipeline,
    family_rules,
    load_pipeline,
    same_weights_image_to_video,
)
from workers.pipelines.diffusion_plan import (
    generation_size,
    native_frames_needed,
    plan_generations,
)
from workers.reports import human_duration
from workers.residency import Residency, Resident, StepDown

ROLE = "video"
CONTINUITY_ROLE = "video-continuity"  # a separate image-to-video model
FrameSink = Callable[[np.ndarray], None]

DEFAULT_NEGATIVE_PROMPT = ("blurry, low quality, worst quality, distorted, deformed, "
                           "watermark, text, jittery, static")


@dataclass(frozen=True)
class DiffusionSettings:
    """``[video]`` with ``backend = "diffusers"``, models resolved to their folders."""

    model_dir: Path
    steps: int | None = None  # denoising steps; None: the family's default
    guidance_scale: float | None = None  # None: the family's default
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    continuity: bool = True  # start each scene from the previous scene's last frame
    i2v_model_dir: Path | None = None  # an image-to-video model for continuity
    max_frames: int | None = None  # per generation; None: the family's
    device: str | None = None  # None: the GPU if there is one
    rung: Rung | None = None  # force a rung of the ladder (benchmarks)
    gpu: GpuSettings = GpuSettings()


@dataclass(frozen=True)
class SceneRequest:
    """One scene, at the job's size and rate."""

    number: int  # from 1
    scenes: int  # in the whole job
    prompt: str  # what the video model is asked for (llm_storyboard.video_prompt)
    frames: int  # at the job's rate
    fps: int
    width: int
    height: int
    seed: int  # the job's: every scene of a job shares it
    first_frame: np.ndarray | None = None  # the previous scene's last frame, for continuity
    frames_after: int = 0  # frames of the scenes still to come, for the ETA


@dataclass(frozen=True)
class RenderProgress:
    scene: int
    scenes: int
    step: int  # steps done in this scene, all generations together
    steps: int
    generation: int  # from 1
    generations: int
    fraction: float  # of this scene's denoising
    eta_s: float | None  # until the last scene is done, if later scenes cost the same per frame

    def message(self) -> str:
        eta = f" · about {human_duration(self.eta_s)} left" if self.eta_s is not None else ""
        return f"scene {self.scene}/{self.scenes} · step {self.step}/{self.steps}{eta}"


ProgressCallback = Callable[[RenderProgress], None]


@dataclass
class SceneResult:
    prompt: str
    frames: int  # handed to the sink
    last_frame: np.ndarray  # the scene's last frame, for the next scene's continuity
    pipeline: str
    rung: str
    dtype: str
    device: str
    generated_size: tuple[int, int]  # (width, height) the model made
    native_fps: int
    generations: list[int]  # frames per generation
    continuity: str  # how the scene began
    load_s: float
    denoise_s: float
    other_s: float  # text encoding, VAE decoding, resampling, the sink
    reused_model: bool
    step_downs: list[StepDown] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.load_s + self.denoise_s + self.other_s

    def report(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["last_frame"]
        data["step_downs"] = [dataclasses.asdict(s) for s in self.step_downs]
        return data


def render_scene(request: SceneRequest, settings: DiffusionSettings, sink: FrameSink,
                 on_progress: ProgressCallback | None = None, *,
                 resident: Residency) -> SceneResult:
    """Render one scene into ``sink``: ``request.frames`` RGB uint8 frames of
    ``request.height × request.width × 3``, in order. The models are loaded into (or
    reused from) ``resident``, the worker's (``job.gpu.resident``).

    ``on_progress`` is called after every denoising step; an exception raised in it
    (a cancel) stops the scene there and comes out of here, with the model still
    resident and usable. A model that cannot be used raises ``ModelError``; a scene
    that does not fit in VRAM even on the lowest rung, ``GpuOutOfMemory``.
    """
    started = time.monotonic()
    device = pick_device(settings.device)
    dtype = pick_dtype(device)
    run = _SceneRun(request, settings, device, dtype, on_progress, resident)
    produced = 0
    for index in range(len(run.plan)):
        native = run.generate(index)
        for frame in run.resampled(native):
            sink(frame)
            produced += 1
    if produced != request.frames:  # a bug, never the user's doing: say so loudly
        raise RuntimeError(f"scene {request.number}: made {produced} frames, not "
                           f"{request.frames}")
    elapsed = time.monotonic() - started
    return SceneResult(
        prompt=request.prompt, frames=produced, last_frame=run.last_output,
        pipeline=run.pipeline_name, rung=str(run.rung), dtype=str(dtype).removeprefix("torch."),
        device=str(device), generated_size=run.size, native_fps=run.rules.native_fps,
        generations=list(run.plan), continuity=run.continuity, load_s=run.load_s,
        denoise_s=run.denoise_s, other_s=max(0.0, elapsed - run.load_s - run.denoise_s),
        reused_model=run.reused, step_downs=run.step_downs,
    )


# --- one scene ------------------------------------------------------------------------------


class _SceneRun:
    """The state of one ``render_scene`` call: models, plan, timings, the frame cursor."""

    def __init__(self, request: SceneRequest, settings: DiffusionSettings, device: Any,
                 dtype: Any, on_progress: ProgressCallback | None, resident: Residency):
        self.request, self.settings, self.residency = request, settings, resident
        self.device, self.dtype = device, dtype
        self.on_progress = on_progress or (lambda progress: None)
        self.load_s, self.denoise_s, self.reused = 0.0, 0.0, True
        self.step_downs: list[StepDown] = []
        self.last_output = np.zeros((request.height, request.width, 3), np.uint8)
        self.done_steps = 0
        self.step_times: list[float] = []  # seconds per step, this scene
        # Taken when the pipeline calls back: on a GPU they lag its kernels by less than
        # a step, which is fine for progress and costs no synchronisation.
        self._call_started = 0.0
        self._step_ends: list[float] = []
        self._choose_models()
        self.rules = family_rules(self.resident.model)
        if settings.steps is not None:
            self.rules = dataclasses.replace(self.rules, steps=settings.steps)
        self.size = generation_size(request.width, request.height, self.rules.size_multiple)
        self.needed = native_frames_needed(request.frames, request.fps, self.rules.native_fps)
        max_frames = settings.max_frames or self.rules.max_frames
        self.plan = plan_generations(self.needed, max_frames, self.rules.frame_step,
                                     self.start_image is not None, self.chained)
        self.native_done = 0  # native frames made so far (repeated start frames not counted)
        self.next_output = 0
        self.previous_native: np.ndarray | None = None

    # -- which pipeline makes which generation

    def _choose_models(self) -> None:
        """Decide how the scene begins and how its generations chain, then load."""
        settings, request = self.settings, self.request
        index = check_pipeline_class(settings.model_dir, TEXT_TO_VIDEO, "text-to-video")
        self.same_weights = same_weights_image_to_video(index)
        separate = settings.i2v_model_dir
        if separate is not None:
            check_requirements(check_pipeline_class(separate, IMAGE_TO_VIDEO,
                                                    "continuity (image-to-video)")["_class_name"])
        if self.same_weights is not None:
            check_requirements(self.same_weights)
        wants_start = settings.continuity and request.first_frame is not None
        # A scene is made by one model, so one set of rules holds for all its frames: a
        # scene that continues the last one with a separate model is all image-to-video;
        # a fresh scene chains its generations only through its own weights.
        self.uses_separate = wants_start and self.same_weights is None and separate is not None
        self.chained = self.same_weights is not None or self.uses_separate
        if wants_start and self.chained:
            self.start_image = request.first_frame
            self.continuity = "continues the previous scene's last frame"
        else:
            self.start_image = None
            self.continuity = (
                "starts afresh: continuity is off" if not settings.continuity else
                "starts afresh: first scene" if request.first_frame is None else
                f"starts afresh: {settings.model_dir.name} cannot continue from an image; "
                "set an image-to-video model for continuity")
        if self.uses_separate:
            self.continuation = self._acquire(CONTINUITY_ROLE, separate)
        else:
            self.text_to_video = self._acquire(ROLE, settings.model_dir)

    def _acquire(self, role: str, model_dir: Path, rung: Rung | None = None) -> Resident:
        acquired = self.residency.acquire(
            role, model_dir, dtype=self.dtype, device=self.device, settings=self.settings.gpu,
            rung=rung or self.settings.rung,
            load=lambda rung: load_pipeline(model_dir, self.dtype, self.device, rung))
        self.load_s += acquired.load_s
        self.reused = self.reused and acquired.reused
        return acquired.resident

    @property
    def resident(self) -> Resident:
        """The model that makes this scene."""
        return self.continuation if self.uses_separate else self.text_to_video

    def _conditioned(self, index: int) -> bool:
        """Whether generation ``index`` starts from a given frame."""
        return self.start_image is not None if index == 0 else self.chained

    def _pipe(self, index: int) -> Any:
        """The pipeline for generation ``index``."""
        resident = self.resident
        if not self._conditioned(index) or self.uses_separate:
            return resident.model
        if "image_to_video" not in resident.extras:
            resident.extras["image_to_video"] = compose_pipeline(resident.model, self.same_weights)
        return resident.extras["image_to_video"]

    @property
    def rung(self) -> Rung:
        return self.resident.rung

    @property
    def pipeline_name(self) -> str:
        return type(self._pipe(len(self.plan) - 1)).__name__

    # -- generating

    def generate(self, index: int) -> np.ndarray:
        """Generation ``index`` as uint8 frames at the generation size, the repeated start
        frame dropped; an out-of-memory error steps down the ladder and tries again."""
        while True:
            try:
                frames = self._call(index)
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                error = one_line(exc)
            # Out of the except block: the failed call's tensors are free to go.
            self._step_down(error)
        return frames[1:] if self._conditioned(index) else frames

    def _step_down(self, error: str) -> None:
        role = CONTINUITY_ROLE if self.uses_separate else ROLE
        step = self.residency.step_down(role, error)
        if step is None:
            raise GpuOutOfMemory(
                f"scene {self.request.number} does not fit in GPU memory even on the "
                f"lowest rung ({self.size[0]}×{self.size[1]}, {max(self.plan)} frames per "
                f"generation; {error}); ask for a smaller size or free the GPU of other "
                "programs")
        self.step_downs.append(step)
        model_dir = self.settings.i2v_model_dir if self.uses_separate else self.settings.model_dir
        # The rung below, even when the settings force one (a benchmark).
        resident = self._acquire(role, model_dir, rung=step.to_rung)
        if self.uses_separate:
            self.continuation = resident
        else:
            self.text_to_video = resident

    def _call(self, index: int) -> np.ndarray:
        import torch

        pipe = self._pipe(index)
        owner = self.resident.model
        self.done_steps = index * self.rules.steps  # a retry after a step down starts over
        arguments = {
            "prompt": self.request.prompt, "negative_prompt": self.settings.negative_prompt,
            "width": self.size[0], "height": self.size[1], "num_frames": self.plan[index],
            "num_inference_steps": self.rules.steps,
            "guidance_scale": self.settings.guidance_scale or self.rules.guidance_scale,
            # Chunks of a scene differ; scenes share the job's seed.
            "generator": torch.Generator("cpu").manual_seed(self.request.seed + index),
            "output_type": "pt", "callback_on_step_end": self._step_callback(index),
            **self.rules.extra,
        }
        if self._conditioned(index):
            arguments["image"] = self._start_image(index)
        denoise_before = self.denoise_s
        self._call_started = time.monotonic()
        self._step_ends = []
        try:
            video = pipe(**arguments).frames[0]  # frames × channels × height × width, 0–1
        except BaseException:
            self.denoise_s = denoise_before
            _reset_after_interrupt(pipe, owner)
            raise
        if pipe is not owner:  # the composed pipeline ran on the owner's offload hooks
            owner.maybe_free_model_hooks()
        self.denoise_s = denoise_before + self._denoise_time()
        # To uint8 where the frames are: a quarter of the bytes to copy back from the GPU,
        # and no pass over float frames on the CPU.
        video = (video.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return video.permute(0, 2, 3, 1).cpu().numpy()

    def _start_image(self, index: int) -> Image.Image:
        frame = self.start_image if index == 0 else self.previous_native
        assert frame is not None
        if frame.shape[1::-1] != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        return Image.fromarray(frame)

    def _denoise_time(self) -> float:
        """The steps' time: the span between the first and the last step callback, plus
        one typical step for the first (whose start is lost in the text encoding)."""
        ends = self._step_ends
        if len(ends) < 2:
            return 0.0
        typical = statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))
        return ends[-1] - ends[0] + typical

    def _step_callback(self, index: int) -> Callable[..., dict[str, Any]]:
        total_steps = self.rules.steps * len(self.plan)

        def on_step_end(pipe: Any, step: int, timestep: Any,
                        tensors: dict[str, Any]) -> dict[str, Any]:
            now = time.monotonic()
            self._step_ends.append(now)
            self.done_steps += 1
            self.step_times.append(now - (self._step_ends[-2] if len(self._step_ends) > 1
                                          else self._call_started))
            self.on_progress(RenderProgress(
                scene=self.request.number, scenes=self.request.scenes, step=self.done_steps,
                steps=total_steps, generation=index + 1, generations=len(self.plan),
                fraction=self.done_steps / total_steps, eta_s=self._eta(total_steps)))
            return tensors

        return on_step_end

    def _eta(self, total_steps: int) -> float | None:
        if len(self.step_times) < 2:
            return None
        step_s = statistics.median(self.step_times[-10:])
        scene_left = (total_steps - self.done_steps) * step_s
        scene_total = total_steps * step_s
        return scene_left + scene_total * self.request.frames_after / self.request.frames

    # -- frames out

    def resampled(self, native: np.ndarray) -> Iterator[np.ndarray]:
        """The job's frames that fall within ``native`` (the next native frames of the
        scene), at the job's size: each output frame is the native frame nearest in time."""
        self.previous_native = native[-1]
        start = self.native_done
        self.native_done += len(native)
        request, ratio = self.request, self.rules.native_fps / self.request.fps
        while self.next_output < request.frames:
            source = min(round(self.next_output * ratio), self.needed - 1)
            if source >= self.native_done:
                return
            frame = native[source - start]
            if frame.shape[1::-1] != (request.width, request.height):
                frame = cv2.resize(frame, (request.width, request.height),
                                   interpolation=cv2.INTER_AREA)
            self.last_output = frame
            self.next_output += 1
            yield frame


def _reset_after_interrupt(pipe: Any, owner: Any) -> None:
    """Leave the pipeline as a finished call would: offload hooks re-armed, stateful
    caches reset, the interrupted call's tensors freed. A cancel or an out-of-memory
    error left the denoising loop between or inside steps; the next call starts clean."""
    for target in {id(pipe): pipe, id(owner): owner}.values():
        target._interrupt = False
        target._current_timestep = None
        target.maybe_free_model_hooks()
    empty_cache()


def last_frame_of_clip(path: Path, width: int, height: int) -> np.ndarray:
    """The last frame of a finished scene clip, for continuity when a restarted job
    reuses clips it already has."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    next(reader)  # the metadata
    last = collections.deque(reader, maxlen=1)
    if not last:
        raise JobError(f"{path.name} has no frames; delete it so the scene is rendered again")
    return np.frombuffer(last[0], np.uint8).reshape(height, width, 3).copy()
