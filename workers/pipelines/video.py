"""The ``video`` job kind: prompt → storyboard → scene clips → post → one MP4 + report.

Stages, each timed into the report and reported as progress:

- plan (0–5 %): the storyboard, from the job's own scenes, the prompt's sentences, or a
  local LLM (``[storyboard] backend = "llm"``);
- render (5–85 %): one clip per scene with the ``animatic`` backend or a local
  diffusers model (``[video] backend = "diffusers"``), reusing clips a previous run of
  the same job already finished;
- post (85–100 %): subtitles, soundtrack, look, smoother motion, transitions and the
  final encode (``workers.pipelines.post``), checked before it lands as ``video.mp4``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon import content, storyboard
from daemon.config import Config
from daemon.jobs import JobError, describe_validation_error
from daemon.storyboard import Scene
from workers import fonts
from workers.context import JobContext, JobResult
from workers.device import GpuSettings
from workers.models import ModelError, located, require, resolve
from workers.pipelines import animatic, encode, footage, post, report
from workers.pipelines.video_settings import (
    Crf,
    LookConfig,
    LookPreset,
    MaxMegabytes,
    MusicChoice,
    MusicFade,
    MusicVolume,
    PostConfig,
    SmoothMotion,
    SubtitleMode,
    SubtitleStyle,
    Transition,
    TransitionSeconds,
)
from workers.vram import VramMonitor

VIDEO_FILE = "video.mp4"
INPUTS: tuple[str, ...] = ()  # text only: the prompt, and the options


class Options(BaseModel):
    """What a ``video`` job may ask for; anything left out follows ``[video]`` and
    ``[post]`` in the config."""

    model_config = ConfigDict(extra="forbid")

    duration: float | None = Field(
        default=None, ge=3, le=64,
        description="total length in seconds; by default the scenes set it",
    )
    # Even sizes: checked by _even, which says why; published in the schema as well.
    width: int | None = Field(default=None, ge=64, le=3840, description="even, in pixels",
                              json_schema_extra={"multipleOf": 2})
    height: int | None = Field(default=None, ge=64, le=2160, description="even, in pixels",
                               json_schema_extra={"multipleOf": 2})
    fps: int | None = Field(default=None, ge=1, le=60, description="frames per second")
    style: str | None = Field(default=None, max_length=200,
                              description="the look, e.g. 'watercolour, soft light'")
    seed: int | None = Field(default=None, ge=0,
                             description="another seed gives another look for the same story")
    scenes: list[Scene] | None = Field(default=None, min_length=1, max_length=8,
                                       description="the scenes themselves, used as given")
    crf: Crf | None = Field(default=None, description="H.264 quality: lower is better, larger")
    # Post-production: the same names as in [post].
    subtitles: SubtitleMode | None = Field(
        default=None, description="burn: drawn in and as a track; soft: track and "
        ".srt/.vtt only; off")
    subtitle_style: SubtitleStyle | None = None
    music: MusicChoice | None = Field(
        default=None, description='a file name in the music library, "random", or "" for none')
    music_volume: MusicVolume | None = None
    music_fade: MusicFade | None = Field(default=None, description="seconds")
    transition: Transition | None = None
    transition_duration: TransitionSeconds | None = Field(default=None, description="seconds")
    look: LookPreset | LookConfig | None = Field(
        default=None, description="a preset, or {preset, brightness, contrast, …}")
    smooth_motion: SmoothMotion | None = Field(
        default=None, description="frame rate × this, by optical flow; 1 is off")
    max_mb: MaxMegabytes | None = Field(default=None, description="size cap in MB; 0 none")

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError("must be even (H.264 with yuv420p needs even sizes)")
        return value

    def post_settings(self, defaults: PostConfig) -> PostConfig:
        """``[post]`` with this job's own post options on top."""
        mine = {name: value for name in PostConfig.model_fields
                if (value := getattr(self, name, None)) is not None}
        return defaults.model_copy(update=mine)


def check_request(prompt: str, options: Options) -> None:
    """Checks across fields, with errors that say how to fix the request."""
    if options.scenes:
        if options.duration is not None:
            storyboard.durations_for_total(options.scenes, options.duration)
        return
    if not prompt.strip():
        raise JobError("the prompt is empty: describe the video in a sentence or more, "
                       "or give the scenes yourself in the 'scenes' option")
    if not storyboard.split_sentences(prompt):
        raise JobError("the prompt has no words, only punctuation: describe the video "
                       "in a sentence or more")


def _model_names(config: Config) -> dict[str, str]:
    """The video model (and its image-to-video partner) with the diffusers backend, and
    the storyboard LLM with the llm planner, by the setting naming each."""
    video, wanted = config.video, {}
    if video.backend == "diffusers":
        wanted["[video] model"] = video.model
        if video.continuity_model:
            wanted["[video] continuity_model"] = video.continuity_model
    if config.storyboard.backend == "llm":
        wanted["[storyboard] model"] = config.storyboard.model
    return wanted


def models(config: Config) -> dict[str, Path]:
    return {setting: located(config.models.dir, name)
            for setting, name in _model_names(config).items()}


def unavailable(config: Config) -> str | None:
    for setting, name in _model_names(config).items():
        try:
            resolve(config.models.dir, name)
        except ModelError as exc:
            return f"{setting}: {exc}"
    return None


def run(job: JobContext) -> JobResult:
    try:
        options = Options.model_validate(job.spec.options)
    except ValidationError as exc:  # a spec.json written by hand or by an older version
        raise JobError(describe_validation_error(exc)) from None
    check_request(job.spec.prompt, options)
    config = job.config
    defaults = config.video
    fmt = encode.VideoFormat(
        width=options.width or defaults.width,
        height=options.height or defaults.height,
        fps=options.fps or defaults.fps,
    )
    post_settings = options.post_settings(config.post)
    # On a GPU host, VRAM is sampled through every stage: its peak and timeline go in
    # the report. On the CPU the monitor does nothing.
    vram = VramMonitor(GpuSettings.from_config(config), on_warning=job.warn)
    with vram:
        board, planned_by = _plan(job, options, fmt)
        # A storyboard written by an LLM can say what the prompt did not.
        content.check([board.title, *board.text().splitlines()], config.queue.blocklist,
                      "storyboard")
        font, font_warnings = fonts.find_font(board.text(), defaults.font)
        for warning in font_warnings:
            job.warn(warning)
        job.progress("plan", 5, f"{len(board.scenes)} scenes, {board.duration_s:.1f} s")

        with job.stage("render"):
            clips, generation = _render(job, board, fmt, font)
            animatic.remove_stale_clips(job.dir, clips)

        # Post: the clips become the finished, verified video.
        with job.stage("post"):
            production = post.produce(
                job, board, [clip.path for clip in clips], fmt, post_settings,
                crf=options.crf if options.crf is not None else defaults.crf,
                font=font, dest=job.dir / VIDEO_FILE,
            )

    options_used = options.model_dump(mode="json", exclude_none=True)
    data = report.build_report(job, options_used, post_settings, board, clips, production, font)
    data["storyboard"]["written_by"] = planned_by
    if generation:
        data["generation"] = generation
    data["made_by"] = report.made_by(data)
    if vram_report := vram.report():
        data["vram"] = vram_report
    report.write_reports(job.dir, data)
    return JobResult(primary=VIDEO_FILE,
                     extras=[path.name for path in production.subtitle_files])


def _plan(job: JobContext, options: Options, fmt: encode.VideoFormat
          ) -> tuple[storyboard.Storyboard, dict[str, object]]:
    """The storyboard (kept in the job folder, so a restart renders the same) and how
    it was written, for the report."""
    settings = job.config.storyboard
    use_llm = settings.backend == "llm" and not options.scenes
    with job.stage("plan"):
        job.progress("plan", 0, "planning the storyboard")
        request = storyboard.PlanRequest(
            prompt=job.spec.prompt,
            fps=fmt.fps,
            scene_seconds=job.config.video.scene_seconds,
            duration=options.duration,
            style=options.style or "",
            seed=options.seed,
            scenes=options.scenes,
            writer=f"llm:{settings.model}" if use_llm else "rules",
        )
        written: dict[str, object] = {"path": "job" if options.scenes else "rules"}

        def write_with_llm(request: storyboard.PlanRequest) -> storyboard.Storyboard:
            from workers.pipelines import llm_storyboard

            llm = llm_storyboard.LlmSettings(
                model_dir=require(job.config.models.dir, settings.model),
                constrained=settings.constrained, gpu=GpuSettings.from_config(job.config))
            made = llm_storyboard.plan_storyboard(
                request, llm, log=job.log, resident=job.gpu.resident,
                on_tokens=lambda done, most: job.progress(
                    "plan", 5 * done / max(most, 1), "writing the storyboard"))
            written.update(made.report())
            if made.path == "rules":
                job.warn(f"the storyboard came from the rules, not the LLM: {made.reason}")
            return made.board

        board, reused = storyboard.load_or_plan(job.dir, request,
                                                write_with_llm if use_llm else None)
        if reused:
            written["path"] = f"{board.planner} (reused from an earlier run of this job)"
        job.log("storyboard reused" if reused else "storyboard planned",
                scenes=len(board.scenes), duration_s=board.duration_s, title=board.title,
                written_by=written["path"])
    return board, written


def _render(job: JobContext, board: storyboard.Storyboard, fmt: encode.VideoFormat,
            font: Path | None) -> tuple[list[animatic.SceneClip], dict[str, object]]:
    """One clip per scene with the configured backend; and, for a model, what it did."""
    clips: list[animatic.SceneClip] = []
    frames_before = 0
    if job.config.video.backend == "animatic":
        for scene in board.scenes:
            on_frames = _render_progress(job, board, scene, frames_before)
            clips.append(animatic.render_scene(job, board, scene, fmt, font, on_frames))
            frames_before += scene.frames
        return clips, {}

    settings = footage.settings_for(job.config)
    previous: footage.Rendered | None = None
    scenes_report = []
    for scene in board.scenes:
        done_before = frames_before

        def on_step(step, scene=scene, done_before=done_before) -> None:
            fraction = (done_before + step.fraction * scene.frames) / board.frames
            job.progress("render", 5 + 80 * fraction, step.message())

        previous = footage.render_scene(job, board, scene, fmt, settings, previous, on_step)
        clips.append(previous.clip)
        scenes_report.append({"scene": scene.number, **previous.details} if previous.details
                             else {"scene": scene.number, "reused": True})
        frames_before += scene.frames
    return clips, {"backend": "diffusers", "model": settings.model_dir.name,
                   "steps": settings.steps or "the model family's default",
                   "scenes": scenes_report}


def _render_progress(job: JobContext, board: storyboard.Storyboard,
                     scene: storyboard.StoryboardScene, frames_before: int
                     ) -> Callable[[int], None]:
    message = f"scene {scene.number} of {len(board.scenes)}"

    def on_frames(done: int) -> None:
        job.progress("render", 5 + 80 * (frames_before + done) / board.frames, message)

    return on_frames
