"""The video kind's tables in config.toml: ``[video]`` (the picture and the render
backend), ``[storyboard]`` (who plans the scenes) and ``[post]`` (what turns scene
clips into a finished video), with the value types its per-job options share. Light to
import: every process reads them with the config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from daemon.config import Duration, Section

SubtitleMode = Literal["burn", "soft", "off"]
SubtitleStyle = Literal["outline", "box"]
Transition = Literal["cut", "crossfade", "fade"]
LookPreset = Literal["none", "natural", "warm", "vintage", "crisp"]
MUSIC_RANDOM = "random"


def _music_name(value: str) -> str:
    # A name inside [post] music_dir, never a path: a job must not read other files.
    if value and (value != value.strip() or "/" in value or "\\" in value
                  or value.startswith(".")):
        raise ValueError('must be "" (no music), "random", or a file name in [post] music_dir '
                         "(no folders, no leading dot)")
    return value


# _music_name checks it; the schema says the same for clients.
MusicChoice = Annotated[str, AfterValidator(_music_name), Field(json_schema_extra={
    "pattern": r"^(?![.\s])(?!.*\s$)[^/\\]*$"})]


def _crf(value: int) -> int:
    if value == 0:
        raise ValueError("0 is lossless, which the H.264 High profile that players and "
                         "browsers take cannot encode: use 1 (nearly lossless) to 51")
    return value


# Shared by the tables and the video kind's per-job options, so both check the same ranges.
# 0 is refused by _crf, which says why; the schema states the same minimum.
Crf = Annotated[int, Field(ge=0, le=51, json_schema_extra={"minimum": 1}), AfterValidator(_crf)]
MusicVolume = Annotated[float, Field(ge=0, le=2)]
MusicFade = Annotated[Duration, Field(le=30)]
TransitionSeconds = Annotated[Duration, Field(ge=0.05, le=2)]
SmoothMotion = Annotated[int, Field(ge=1, le=4)]
MaxMegabytes = Annotated[float, Field(ge=0)]


class StoryboardConfig(Section):
    # "rules": split the prompt at sentences; "llm": a local chat model writes the scenes.
    backend: Literal["rules", "llm"] = "rules"
    # The chat model for backend = "llm" (e.g. Qwen2.5-1.5B-Instruct in [models] dir).
    model: str = ""
    # Schema-constrained decoding (outlines): the JSON is valid by construction.
    constrained: bool = True

    @model_validator(mode="after")
    def _model_for_llm(self) -> StoryboardConfig:
        if self.backend == "llm" and not self.model:
            raise ValueError('backend = "llm" needs model = "<a chat model folder in [models] '
                             'dir>", e.g. "Qwen2.5-1.5B-Instruct"')
        return self


class VideoConfig(Section):
    # "animatic": a storyboard film, needs no weights; "diffusers": a local text-to-video
    # model (Wan 2.1/2.2, LTX-Video, CogVideoX), its family read from model_index.json.
    backend: Literal["animatic", "diffusers"] = "animatic"
    # The text-to-video model for backend = "diffusers": a name in [models] dir.
    model: str = ""
    # Start each scene from the previous scene's last frame (image-to-video).
    continuity: bool = True
    # A separate image-to-video model for continuity, when the main model has none.
    continuity_model: str = ""
    # Denoising steps; 0: the model family's default.
    steps: int = Field(default=0, ge=0, le=200)
    width: int = Field(default=832, ge=64, le=3840)
    height: int = Field(default=480, ge=64, le=2160)
    fps: int = Field(default=16, ge=1, le=60)
    scene_seconds: float = Field(default=5.0, ge=3, le=8)
    crf: Crf = 20
    font: Path | None = None

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (H.264 with yuv420p needs even sizes)")
        return value

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        if self.font is not None:
            self.font = resolve(self.font)

    @model_validator(mode="after")
    def _model_for_diffusers(self) -> VideoConfig:
        if self.backend == "diffusers" and not self.model:
            raise ValueError('backend = "diffusers" needs model = "<a model folder in [models] '
                             'dir>", e.g. "Wan2.1-T2V-1.3B-Diffusers"')
        return self


class LookConfig(Section):
    """A colour look: a preset, and raw values that override the preset's."""

    preset: LookPreset = "none"
    brightness: float | None = Field(default=None, ge=-1, le=1)
    contrast: float | None = Field(default=None, ge=0, le=3)
    saturation: float | None = Field(default=None, ge=0, le=3)
    warmth: float | None = Field(default=None, ge=-1, le=1)
    vignette: float | None = Field(default=None, ge=0, le=1)
    sepia: float | None = Field(default=None, ge=0, le=1)
    denoise: float | None = Field(default=None, ge=0, le=1)
    white_balance: bool | None = None
    clahe: float | None = Field(default=None, ge=0, le=8)


class PostConfig(Section):
    subtitles: SubtitleMode = "burn"
    subtitle_style: SubtitleStyle = "outline"
    music: MusicChoice = ""
    music_dir: Path | None = None
    music_volume: MusicVolume = 0.5
    music_fade: MusicFade = 2.0
    transition: Transition = "crossfade"
    transition_duration: TransitionSeconds = 0.5
    look: LookPreset | LookConfig = "none"
    smooth_motion: SmoothMotion = 1
    max_mb: MaxMegabytes = 0

    def resolve_paths(self, resolve: Callable[[Path], Path]) -> None:
        if self.music_dir is not None:
            self.music_dir = resolve(self.music_dir)


SETTINGS = {"video": VideoConfig, "storyboard": StoryboardConfig, "post": PostConfig}
