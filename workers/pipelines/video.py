"""The ``video`` job kind: prompt → storyboard → scene clips → one H.264 MP4 + report.

Stages, each timed into the report and reported as progress:

- plan (0–5 %): the storyboard, from the job's own scenes or the prompt's sentences;
- render (5–90 %): one clip per scene with the ``animatic`` backend, reusing clips a
  previous run of the same job already finished;
- encode (90–100 %): the clips joined into ``video.mp4``, checked frame for frame.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.jobs import JobError, describe_validation_error
from workers import fonts
from workers.context import JobContext, JobResult
from workers.pipelines import animatic, encode, report, storyboard
from workers.pipelines.storyboard import Scene

VIDEO_FILE = "video.mp4"
INPUTS: tuple[str, ...] = ()  # text only: the prompt, and the options


class Options(BaseModel):
    """What a ``video`` job may ask for; anything left out follows ``[video]`` in the config."""

    model_config = ConfigDict(extra="forbid")

    duration: float | None = Field(
        default=None, ge=3, le=64,
        description="total length in seconds; by default the scenes set it",
    )
    width: int | None = Field(default=None, ge=64, le=3840, description="even, in pixels")
    height: int | None = Field(default=None, ge=64, le=2160, description="even, in pixels")
    fps: int | None = Field(default=None, ge=1, le=60, description="frames per second")
    style: str | None = Field(default=None, max_length=200,
                              description="the look, e.g. 'watercolour, soft light'")
    seed: int | None = Field(default=None, ge=0,
                             description="another seed gives another look for the same story")
    scenes: list[Scene] | None = Field(default=None, min_length=1, max_length=8,
                                       description="the scenes themselves, used as given")

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError("must be even (H.264 with yuv420p needs even sizes)")
        return value


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


def run(job: JobContext) -> JobResult:
    try:
        options = Options.model_validate(job.spec.options)
    except ValidationError as exc:  # a spec.json written by hand or by an older version
        raise JobError(describe_validation_error(exc)) from None
    check_request(job.spec.prompt, options)
    defaults = job.config.video
    fmt = encode.VideoFormat(
        width=options.width or defaults.width,
        height=options.height or defaults.height,
        fps=options.fps or defaults.fps,
        crf=defaults.crf,
    )

    # 1. Plan: the storyboard, kept in the job directory so a restart renders the same.
    with job.stage("plan"):
        job.progress("plan", 0, "planning the storyboard")
        request = storyboard.PlanRequest(
            prompt=job.spec.prompt,
            fps=fmt.fps,
            scene_seconds=defaults.scene_seconds,
            duration=options.duration,
            style=options.style or "",
            seed=options.seed,
            scenes=options.scenes,
        )
        board, reused = storyboard.load_or_plan(job.dir, request)
        job.log("storyboard reused" if reused else "storyboard planned",
                scenes=len(board.scenes), duration_s=board.duration_s, title=board.title)
        font, font_warnings = fonts.find_font(board.text(), defaults.font)
        for warning in font_warnings:
            job.warn(warning)
        job.progress("plan", 5, f"{len(board.scenes)} scenes, {board.duration_s:.1f} s")

    # 2. Render: one clip per scene (the only backend so far is the animatic).
    with job.stage("render"):
        clips = []
        frames_before = 0
        for scene in board.scenes:
            on_frames = _render_progress(job, board, scene, frames_before)
            clips.append(animatic.render_scene(job, board, scene, fmt, font, on_frames))
            frames_before += scene.frames
        animatic.remove_stale_clips(job.dir, clips)

    # 3. Encode: join the clips without re-encoding and check the result.
    with job.stage("encode"):
        job.progress("encode", 90, "joining the scene clips")
        video = job.dir / VIDEO_FILE
        info = encode.stitch([clip.path for clip in clips], video, fmt, board.frames)
        job.progress("encode", 100, f"{info.duration_s:.1f} s video ready")

    options_used = options.model_dump(mode="json", exclude_none=True)
    report.write_reports(job.dir, report.build_report(job, options_used, board, clips, video,
                                                      info, font))
    return JobResult(primary=VIDEO_FILE)


def _render_progress(job: JobContext, board: storyboard.Storyboard,
                     scene: storyboard.StoryboardScene, frames_before: int
                     ) -> Callable[[int], None]:
    message = f"scene {scene.number} of {len(board.scenes)}"

    def on_frames(done: int) -> None:
        job.progress("render", 5 + 85 * (frames_before + done) / board.frames, message)

    return on_frames
